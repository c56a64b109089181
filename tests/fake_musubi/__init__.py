"""A fake musubi-tuner (and a fake ``accelerate launch``) for CI: real output formats, no GPU."""
