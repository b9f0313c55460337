"""The Open Inference Protocol (KServe v2): a second front-end over the serving service."""
