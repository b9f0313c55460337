"""``python -m dgserve.ray_serve config|run|deploy ...`` (see ``dgserve.ray_serve.config``)."""

from dgserve.ray_serve.config import main

if __name__ == "__main__":
    raise SystemExit(main())
