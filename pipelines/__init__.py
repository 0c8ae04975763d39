"""Everything that runs jobs: config loading, preprocessing (Ray Data), the cache,
training (Ray Train + DeepSpeed) and serving (Ray Serve).

    config.py         the config schema: frozen dataclasses per section, TrainConfig, InferenceConfig
    config_file.py    reading config files (parsed, never run), type checks, Open-Sora aliases, overrides
    commands.py       one function per CLI command: loads the config, calls the job
    dataset.py        the input table (CSV/Parquet): required columns, metadata columns, sample ids
    probe.py          frame count, displayed size and fps of a file, without decoding frames
    media.py          decoding frames, resize and centre crop, writing mp4
    models.py         the configured VAE, T5 and diffusion transformer, loaded one way everywhere
    preprocess.py     `sora preprocess`: the Ray Data stages and the job around them
    cache.py          the cache: layout, column names, Arrow schema, fingerprint, rejects, reader
    bucket_report.py  `sora bucket-report` from a table or a cache
    plots.py          the bucket report drawn as a PNG (matplotlib)
    train_data.py     training batches from the cache: epoch plans, windows, posterior draws, masks, prefetch
    device.py         GPU or CPU for training: backend, DeepSpeed accelerator and dtype from one decision
    checkpoint.py     checkpoint folders: layout, TrainState, save / load, newest complete one
    trainer.py        the training worker without Ray: engine, step, EMA, log, loop; one process
    train.py          `sora train`: the plan, and the Ray Train job that runs trainer.py's worker
    batch_search.py   `sora search-batch-size`: the largest batch per bucket that fits, trial processes
    preview.py        training previews: sampled from a checkpoint's EMA weights beside training
    cluster.py        joining (or starting) a Ray cluster: one policy for every command
    reaper.py         the watcher that stops a command's local Ray instance when the command ends
    sample.py         `sora sample`: prompts and references checked, the Sampler, long video
    serve.py          the Ray Serve application (configs/serve.yaml): the page, the API, the jobs
    jobs.py           serving jobs' bookkeeping: states, progress, time left, how long they are kept
    web/              the web page: index.html, app.js, style.css (plain files, served as they are)
    demo_data.py      `sora demo-data`: a small captioned dataset of moving shapes
    contact_sheet.py  a grid of video frames with a caption under each row (PNG)
    demo_eval.py      `sora demo-eval`: judges demo videos against their captions from the pixels; contact sheet
    demo_vae.py       `sora fit-demo-vae`: a small SD-geometry VAE fitted to demo frames, so the demo can learn

Imports point down: cli.py -> pipelines -> sora_model, bucketing. Inside pipelines,
the job modules (preprocess, train, sample, serve, bucket_report, demo_eval, demo_vae,
batch_search) import the shared ones (config, cache, dataset, media, models, checkpoint, cluster,
device, trainer, jobs) and never each
other, except serve, which serves `sample`'s Sampler, and demo_vae, whose fit is judged by
demo_eval's measurement, as the demo's samples are; trainer.py never imports ray.
"""

from pipelines.config import ConfigError
from sora_model.errors import ModelLoadError

# Errors caused by input a user can fix: the CLI prints them as one line, no traceback.
# OSError covers paths a user gave that cannot be read or written (missing, a file where a
# folder is needed, no permission).
USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, ModelLoadError, OSError)
