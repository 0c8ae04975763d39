"""Open-Sora's three-level buckets (resolution, frames, aspect ratio): pure Python.

Imports only the standard library and numpy, so the same functions run in
preprocessing workers, in the training sampler and in `sora bucket-report`.

    aspect.py    resolution names, pixel budgets and aspect tables (generated; PixArt's from
                 aspect_pixart_1024.json), nearest aspect key
    config.py    `bucket_config` parsed and checked into a BucketConfig; the fixed-size form;
                 the batch size of a (resolution, T)
    assign.py    which bucket each sample goes to (vectorised), why a sample is dropped,
                 bucket names `<res>-<T>f-<ar>` and their parser
    report.py    aggregation of assignments into the report (text, dict); no I/O

Inside the package: config imports aspect; assign imports aspect and config; report
imports assign. Nothing here imports the rest of the project.
"""
