"""What every layer uses: params parsing (``config``), the pipeline's paths (``paths``), atomic
files and CLI plumbing (``utils``), image decoding (``imageio``), the augment cache (``cache``)
and downloads / safe extraction (``fetch``). Nothing here imports a task package or a stage.
"""
