#!/usr/bin/env bash
# Generates the Python protobuf module of the email queue's messages
# (usher/notification/v1/email_job_pb2.py) from the contracts in proto/, into
# the folder given (default: gen/ beside this script). Nothing generated is
# committed: run this after installing requirements.txt, then put the folder
# on PYTHONPATH.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:-$here/gen}"
python="${PYTHON:-python3}"
mkdir -p "$out"
"$python" -m grpc_tools.protoc -I "$here/../../proto" --python_out="$out" \
  usher/notification/v1/email_job.proto
