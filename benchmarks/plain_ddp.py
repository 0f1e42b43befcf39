"""The reference for the overhead benchmark: a plain torchrun DDP script, no Ray.

Same model, tokenizer, padding, batch size, optimizer and rows as ``raytune-ft run`` on the text
recipe; data is pre-tokenised in memory (the cheapest possible input pipeline).
Run: torchrun --nproc_per_node 2 benchmarks/plain_ddp.py --rows N --epochs E --batch-size B
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from raytune_ft import load_recipe
from raytune_ft.data import assets
from raytune_ft.data.tabular import holdout_bucket
from raytune_ft.tasks.text_classification import TextClassification

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, required=True)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-5)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    torch.manual_seed(0)

    labels = ["negative", "neutral", "positive"]
    recipe = load_recipe(ROOT / "jobs" / "text_classification.yaml", [f"model.path={assets.minilm_l6()}", f"task.max_length={args.max_length}"])
    task = TextClassification(recipe, labels)
    table = pq.read_table(assets.drug_reviews("train")).to_pydict()
    keep = holdout_bucket(np.array(table["review"])) >= 0.15  # the recipe's validation holdout
    texts = np.array(table["review"])[keep][: args.rows]
    targets = np.array([labels.index(v) for v in np.array(table["rating"])[keep][: args.rows]])
    encoded = task.preprocess({"text": texts, "label": targets})
    per_worker = len(texts) // world
    mine = slice(rank * per_worker, (rank + 1) * per_worker)
    ids, ys = encoded["input_ids"][mine], encoded["labels"][mine]

    model = torch.nn.parallel.DistributedDataParallel(task.build_model())
    model.train()  # from_pretrained returns eval mode; fine-tuning trains with the model's dropout
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    rates = []
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
        rates.append(per_worker * world / (time.perf_counter() - started))
    if rank == 0:
        print(json.dumps({"samples_per_s_by_epoch": rates}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
