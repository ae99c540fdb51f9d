"""One-shot job: create the MLflow artifact bucket in the S3-compatible store (idempotent)."""

import os
import sys
import time

import boto3
from botocore.exceptions import ClientError, EndpointConnectionError

bucket = os.environ["ARTIFACT_BUCKET"]
s3 = boto3.client("s3", endpoint_url=os.environ["MLFLOW_S3_ENDPOINT_URL"])
for _attempt in range(30):
    try:
        names = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
        if bucket not in names:
            s3.create_bucket(Bucket=bucket)
        print(f"bucket {bucket} ready")
        sys.exit(0)
    except (ClientError, EndpointConnectionError) as error:
        print(f"waiting for the object store: {error}", file=sys.stderr)
        time.sleep(2)
sys.exit(1)
