"""A toy world whose media can be checked on CPU (issue 10).

- :mod:`polymodal.toyworld.data`: seeded procedural images (coloured shapes), tones, moving-shape videos
  with captions, written as files + ``catalog.jsonl`` (MosIT catalog and training JSONL compatible).
- :mod:`polymodal.toyworld.checkers`: read a medium back (colour and shape, pitch and timbre, direction).
- :mod:`polymodal.toyworld.tokenizer`: the toy decoders' offline WordLevel tokenizer.
- :mod:`polymodal.toyworld.train`: toy decoders trained from scratch, saved as the stock diffusers pipelines
  the real decoders wrap (image ``StableDiffusionPipeline``, audio ``AudioLDMPipeline``, video
  ``TextToVideoSDPipeline``), loaded by ``decoders.build_decoder(m, decoder_config(OUT, m))``.
  Not trained: the audio vocoder (a ``SpeechT5HifiGan`` whose weights are set to overlap-add sinusoids at
  200 Hz-spaced bins; a HiFi-GAN trained from scratch costs far more than this CPU budget), so the audio
  VAE's "mel spectrogram" is a 16-bin sinusoid-amplitude spectrogram (:func:`~polymodal.toyworld.train.tone_spectrogram`).
- :mod:`polymodal.toyworld.encoder`: the toy image encoder (input side), a tiny transformers ``CLIPModel``
  trained contrastively on toy image-caption pairs, loaded as encoder kind ``clip`` by
  ``polymodal.encoders.build_encoder(Modality.IMAGE, encoder_config(OUT))``.
- :mod:`polymodal.toyworld.evaluate`: checker scores on procedural data and on a decoder's output.

Deterministic rebuild (cached by config hash; one torch thread)::

    polymodal toyworld data --out toy/data --count 2400 --seed 0 --modalities image,audio,video
    polymodal toyworld train-decoders --data toy/data --out toy/decoders
    polymodal toyworld train-encoder --data toy/data --out toy/encoders
    polymodal toyworld score-decoder --out toy/decoders --modality image --n 48
"""
