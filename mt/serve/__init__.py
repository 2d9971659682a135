"""`mt serve`: a trained model behind HTTP, with dynamic batching and a page to try it.

limits.py   what a request may ask and how much work the server holds (plain settings)
worker.py   the one thread that owns the model: queued requests -> token-budget batches
api.py      the FastAPI app: request/response schemas, errors as one-line JSON, the page
server.py   `mt serve`: load the run, run uvicorn, exit 0 on SIGTERM once in-flight work is done
page.html   the page at GET /, self-contained (inline CSS and JavaScript)
"""

from mt.errors import MtError


def check_installed() -> None:
    """MtError with the install hint unless the serve extra (FastAPI, uvicorn) is installed."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise MtError(f"mt serve needs {exc.name}: pip install 'mt[serve]'") from None
