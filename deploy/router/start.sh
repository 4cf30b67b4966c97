#!/bin/sh
# The cache-aware router of the groupwise replicas: vllm-router, behind nginx (deploy/nginx),
# which sends it every request without an X-Group-Id. Every setting of it lives here;
# compose, Kubernetes, the tests and bench/scale.py add only where the replicas are and where
# to listen:
#     sh deploy/router/start.sh --worker-urls http://server:8000 http://server-2:8000 --port 8080
# A flag given again after these wins (vllm-router reads its flags with argparse).
#
# Routing (docs/deployment.md, "How it decides"): a request goes to the replica whose past
# prompts share the longest prefix with it (token ids, from each replica's
# /v1/chat/completions/render) when that prefix is over 60% of the prompt, otherwise to the
# replica with the fewest requests in flight. Once a replica has more than one group
# (GROUPWISE_MAX_GROUP_SIZE, the replicas' own setting, default 8) and half again as many requests
# in flight as another, the one with the fewest in flight gets the request whatever its prefix:
# a prefix that every request shares (an app's instructions) cannot pull all traffic onto the
# replica that saw it first, while a passage's questions asked together stay together.
#
# Health: /health every 5 s; one failure takes a replica out, one success brings it back.
# A replica that answers a request with a 5xx or cannot be reached is skipped for 10 s (its
# circuit opens at the first failure), so the router's next attempt goes to another replica.
# Attempts: 3 at most per request (vllm-router retries 408, 429, 500, 502, 503, 504 and
# failed connections); a stream that has begun is never retried.
set -eu
exec "${VLLM_ROUTER:-vllm-router}" \
    --policy cache_aware \
    --cache-threshold 0.6 \
    --balance-abs-threshold "${GROUPWISE_MAX_GROUP_SIZE:-8}" \
    --balance-rel-threshold 1.5 \
    --health-check-endpoint /health \
    --health-check-interval-secs 5 \
    --health-failure-threshold 1 \
    --health-success-threshold 1 \
    --cb-failure-threshold 1 \
    --cb-success-threshold 1 \
    --cb-timeout-duration-secs 10 \
    --retry-max-retries 3 \
    --worker-startup-check-interval 1 \
    --host 0.0.0.0 \
    --port 8080 \
    --prometheus-host 0.0.0.0 \
    --prometheus-port 29000 \
    "$@"
