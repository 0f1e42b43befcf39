"""The reference for the overhead and start-up benchmarks: a plain torchrun DDP script, no Ray.

Same model, tokenizer, padding, batch size, optimizer and rows as ``raytune-ft run`` on the text
recipe; data is pre-tokenised in memory (the cheapest possible input pipeline). With
``--max-steps`` it does what a short run of the recipe does around its training steps too: it
evaluates the test rows and exports the model (rank 0), so the start-up benchmark compares the
same work.

Run: torchrun --nproc_per_node 2 benchmarks/plain_ddp.py --rows N --epochs E --batch-size B
     torchrun --nproc_per_node 2 benchmarks/plain_ddp.py --rows 128 --max-steps 4 --export DIR
"""

import argparse
import json
import tempfile
import time

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from raytune_ft.data import assets
from raytune_ft.data.tabular import holdout_bucket
from raytune_ft.schema import Recipe
from raytune_ft.tasks.text_classification import TextClassification

LABELS = ["negative", "neutral", "positive"]


def encoded_rows(task, split: str, rows: int, keep_holdout: bool):
    table = pq.read_table(assets.drug_reviews(split)).to_pydict()
    texts = np.array(table["review"])
    keep = holdout_bucket(texts) >= 0.15 if keep_holdout else np.ones(len(texts), dtype=bool)  # the recipe's validation holdout
    targets = np.array([LABELS.index(v) for v in np.array(table["rating"])[keep][:rows]])
    return task.preprocess({"text": texts[keep][:rows], "label": targets})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, required=True)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps, then evaluate the test rows and export")
    parser.add_argument("--export", default=None, help="with --max-steps: the directory rank 0 exports the model to")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-5)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    torch.manual_seed(0)

    recipe = Recipe(name="plain", task=TextClassification.Options(type="text_classification", max_length=args.max_length),
                    model={"path": str(assets.minilm_l6())}, data={"train": "unused"})
    task = TextClassification(recipe, LABELS)
    encoded = encoded_rows(task, "train", args.rows, keep_holdout=True)
    per_worker = len(encoded["labels"]) // world
    mine = slice(rank * per_worker, (rank + 1) * per_worker)
    ids, ys = encoded["input_ids"][mine], encoded["labels"][mine]

    model = torch.nn.parallel.DistributedDataParallel(task.build_model())
    model.train()  # from_pretrained returns eval mode; fine-tuning trains with the model's dropout
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    rates, steps, train_s = [], 0, 0.0
    for epoch in range(args.epochs):
        order = np.random.default_rng(epoch).permutation(per_worker)
        started = time.perf_counter()
        for start in range(0, per_worker, args.batch_size):
            index = order[start : start + args.batch_size]
            batch = task.collate({"input_ids": ids[index], "labels": ys[index]})
            loss, _ = task.forward(model, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            steps += 1
            if steps == args.max_steps:
                break
        train_s += time.perf_counter() - started
        rates.append(per_worker * world / (time.perf_counter() - started))
        if steps == args.max_steps:
            break
    if args.max_steps:  # what a run does after training: the test rows scored, the model exported
        test = encoded_rows(task, "test", args.rows, keep_holdout=False)
        metrics = task.new_metrics()
        model.eval()
        with torch.no_grad():
            for start in range(rank * 2 * args.batch_size, len(test["labels"]), world * 2 * args.batch_size):
                rows = slice(start, start + 2 * args.batch_size)
                batch = task.collate({"input_ids": test["input_ids"][rows], "labels": test["labels"][rows]})
                metrics.update(task.forward(model.module, batch)[1], batch)
        state = metrics.state()
        dist.all_reduce(state)
        if rank == 0:
            task.save_pretrained(model.module, args.export or tempfile.mkdtemp(prefix="plain_ddp_export_"))
    if rank == 0:
        print(json.dumps({"samples_per_s_by_epoch": rates, "train_s": train_s, "steps": steps}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
