"""T5 encoder-decoder models: config, network, decoding and the trainer-facing interface."""
