"""The config's sections, one module per stage of a model's life; `plinth.config.schema`
assembles them into `Config`."""
