"""Lightning training: the LightningModule, callbacks, FSDP wrapping and the ``aoe fit`` / ``aoe export`` commands."""
