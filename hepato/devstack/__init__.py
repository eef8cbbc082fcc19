"""The local development stack: real Postgres, Redis and S3 servers from wheels (`hepato up`)."""
