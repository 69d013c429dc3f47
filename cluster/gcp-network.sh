#!/usr/bin/env bash
# One-time GCP network for cluster/gcp-gpu.yaml: a private VPC whose firewall admits traffic
# between the cluster's nodes and SSH from the operator's address only, plus Cloud NAT so that
# workers without external addresses reach PyPI and the model hub. No rule opens the Ray
# dashboard / job API (8265), the Ray client (10001) or the GCS (6379) to the internet.
# Usage: PROJECT=my-gcp-project OPERATOR_CIDR=203.0.113.10/32 bash cluster/gcp-network.sh
set -euo pipefail
: "${PROJECT:?set PROJECT}"
: "${OPERATOR_CIDR:?set OPERATOR_CIDR to your address, e.g. 203.0.113.10/32}"
REGION="${REGION:-us-central1}"
SUBNET_RANGE="${SUBNET_RANGE:-10.42.0.0/16}"
if [[ "$OPERATOR_CIDR" == "0.0.0.0/0" ]]; then
  echo "refusing OPERATOR_CIDR=0.0.0.0/0: SSH must not be open to the internet" >&2
  exit 2
fi

gcloud compute networks create lensray --project "$PROJECT" --subnet-mode custom
gcloud compute networks subnets create lensray --project "$PROJECT" --network lensray \
  --region "$REGION" --range "$SUBNET_RANGE" --enable-private-ip-google-access
gcloud compute firewall-rules create lensray-allow-internal --project "$PROJECT" --network lensray \
  --direction INGRESS --allow tcp,udp,icmp --source-ranges "$SUBNET_RANGE"
gcloud compute firewall-rules create lensray-allow-ssh --project "$PROJECT" --network lensray \
  --direction INGRESS --allow tcp:22 --source-ranges "$OPERATOR_CIDR"
gcloud compute routers create lensray-router --project "$PROJECT" --network lensray --region "$REGION"
gcloud compute routers nats create lensray-nat --project "$PROJECT" --router lensray-router \
  --region "$REGION" --auto-allocate-nat-external-ips --nat-all-subnet-ip-ranges
