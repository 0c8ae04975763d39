"""Everything that runs jobs: config loading, preprocessing (Ray Data), the cache,
training (Ray Train + DeepSpeed) and serving (Ray Serve)."""

from pipelines.config import ConfigError
from sora_model.errors import ModelLoadError

# Errors caused by input a user can fix: the CLI prints them as one line, no traceback.
USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, ModelLoadError, FileNotFoundError)
