"""Fine-tuning SARMAE encoders for classification, segmentation and detection (SARMAE_SPEC 5)."""
