"""FluoroSAM model: image encoder, text encoder + VQ, SAM prompt encoder and mask decoder."""
