#!/usr/bin/env bash
# The network a cloud cluster of cluster/aws.yaml or cluster/gcp.yaml joins: SSH from one range you
# name, every port between the cluster's own nodes, nothing else in. Run it once per account/project:
#
#   SSH_CIDR=203.0.113.0/24 cluster/network.sh aws    # prints the security group id for aws.yaml
#   SSH_CIDR=203.0.113.0/24 GCP_PROJECT=YOUR_PROJECT_ID cluster/network.sh gcp
#
# 203.0.113.0/24 is a documentation range: give the range you connect from (curl -s ifconfig.me,
# then /32). The launchers cannot do this themselves: Ray's AWS launcher adds SSH from 0.0.0.0/0 to
# every security group it creates, and its GCP launcher has no firewall settings at all.
set -euo pipefail

cloud=${1:?usage: SSH_CIDR=A.B.C.D/N cluster/network.sh aws|gcp}
cidr=${SSH_CIDR:?set SSH_CIDR to the range you connect from, e.g. 198.51.100.7/32}
case "$cidr" in
  0.0.0.0/0 | ::/0) echo "SSH_CIDR: $cidr is the whole internet; give the range you connect from" >&2; exit 2 ;;
esac
name=raytune-ft

case "$cloud" in
  aws)
    region=${AWS_REGION:-us-west-2}   # aws.yaml's provider.region
    vpc=${VPC_ID:-$(aws ec2 describe-vpcs --region "$region" --filters Name=is-default,Values=true \
      --query 'Vpcs[0].VpcId' --output text)}
    group=$(aws ec2 create-security-group --region "$region" --vpc-id "$vpc" --group-name "$name" \
      --description "raytune-ft: SSH from $cidr, every port between the cluster's nodes" --query GroupId --output text)
    aws ec2 authorize-security-group-ingress --region "$region" --group-id "$group" --ip-permissions \
      "IpProtocol=tcp,FromPort=22,ToPort=22,IpRanges=[{CidrIp=$cidr}]" \
      "IpProtocol=-1,UserIdGroupPairs=[{GroupId=$group}]" > /dev/null
    echo "$group"
    ;;
  gcp)
    project=${GCP_PROJECT:?set GCP_PROJECT to the project of gcp.yaml (provider.project_id)}
    region=${GCP_REGION:-us-central1}   # gcp.yaml's provider.region
    # A network of its own: unlike the default network, it starts with no rule that admits anything.
    gcloud compute networks create "$name" --project "$project" --subnet-mode custom
    gcloud compute networks subnets create "$name" --project "$project" --network "$name" --region "$region" \
      --range 10.20.0.0/20
    gcloud compute firewall-rules create "$name-internal" --project "$project" --network "$name" \
      --direction INGRESS --action ALLOW --rules all --source-tags "$name" --target-tags "$name"
    gcloud compute firewall-rules create "$name-ssh" --project "$project" --network "$name" \
      --direction INGRESS --action ALLOW --rules tcp:22 --source-ranges "$cidr" --target-tags "$name"
    ;;
  *) echo "usage: SSH_CIDR=A.B.C.D/N cluster/network.sh aws|gcp" >&2; exit 2 ;;
esac
