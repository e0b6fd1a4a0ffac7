"""Codecs: how a modality's raw form becomes what the model reads and writes, and back.

image.py is the image representation (pixels, a frozen VAE's latents, or VQ codes), built from the
config; vae.py / diffusers_vae.py and vq.py are the models behind the last two. speech.py is the
speech unit codec (log-mel frames of audio.py -> k-means units -> vocoder.py back to a waveform).
"""
