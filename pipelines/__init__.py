"""Everything that runs jobs: config loading, preprocessing (Ray Data), the cache,
training (Ray Train + DeepSpeed) and serving (Ray Serve)."""

from pipelines.config import ConfigError
from sora_model.errors import ModelLoadError

# Errors caused by input a user can fix: the CLI prints them as one line, no traceback.
# OSError covers paths a user gave that cannot be read or written (missing, a file where a
# folder is needed, no permission).
USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, ModelLoadError, OSError)
