"""The offline demo: a tiny class-conditional diffusion model on scikit-learn's digits, a kohya
LoRA trained on a small styled subset, and AutoLoRA sampling through k-diffusion samplers."""
