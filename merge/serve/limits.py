"""The server's default bounds (``python -m merge serve``'s option defaults): what one request and the whole
server may hold. Kept apart so that the command line reads them without importing the server."""

DEFAULT_MAX_BATCH = 8  # rows decoded together
DEFAULT_MAX_QUEUE = 64  # requests waiting for a row
DEFAULT_MAX_TOKENS = 1024  # new tokens a request may ask for (and gets when it does not ask)
DEFAULT_MAX_PROMPT_TOKENS = 16384  # a request's prompt, image and video tokens included
DEFAULT_MAX_REQUEST_BYTES = 32 << 20  # a request body (images inline as base64 included)
DEFAULT_MAX_MEDIA_BYTES = 16 << 20  # one image or video, decoded or downloaded
DEFAULT_MEDIA_TIMEOUT = 10.0  # seconds for one download
