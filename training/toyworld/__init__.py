"""A toy world whose media can be checked on CPU (issue 10).

- :mod:`training.toyworld.data`: seeded procedural images (coloured shapes), tones, moving-shape videos
  with captions, written as files + ``catalog.jsonl`` (MosIT catalog and training JSONL compatible).
- :mod:`training.toyworld.checkers`: read a medium back (colour and shape, pitch and timbre, direction).
- :func:`training.toyworld.data.toy_tokenizer`: the toy decoders' offline WordLevel tokenizer.
- :mod:`training.toyworld.train`: toy decoders trained from scratch, saved as stock diffusers pipelines that
  the real decoders load (image ``StableDiffusionPipeline``, audio ``AudioLDMPipeline``, video
  ``AnimateDiffPipeline``: its motion modules have frame positions, UNet3D's temporal attention has none),
  loaded by ``decoders.build_decoder(m, decoder_config(OUT, m))`` (:func:`polymodal.presets.toy.decoder_config`).
  Not trained: the audio vocoder (a ``SpeechT5HifiGan`` whose weights are set to overlap-add sinusoids at
  200 Hz-spaced bins; a HiFi-GAN trained from scratch costs far more than this CPU budget), so the audio
  VAE's "mel spectrogram" is a 16-bin sinusoid-amplitude spectrogram (:func:`~training.toyworld.train.tone_spectrogram`).
- :mod:`training.toyworld.encoder`: the toy image encoder (input side), a tiny transformers ``CLIPModel``
  trained contrastively on toy image-caption pairs, loaded as encoder kind ``clip`` by
  ``polymodal.encoders.build_encoder(Modality.IMAGE, encoder_config(OUT))``.
- :mod:`training.toyworld.evaluate`: checker scores on procedural data, on a decoder's output, and on a
  whole pipeline's answers to requests (with the shuffled-states control).
- :mod:`training.toyworld.phrasings`: how requests are worded; a training bank and a disjoint held-out bank.
- :mod:`training.toyworld.mosit`: a deterministic toy dialogue writer for ``polymodal mosit build``
  (``training/toyworld/mosit.yaml``).
- :mod:`training.toyworld.align`: alignment data (text-to-X request records) for ``polymodal train``.
- :mod:`training.toyworld.build`: the whole toy world in one cached, deterministic command.
- the runtime reads a build: :mod:`polymodal.presets.toy` (the ``toy`` preset over a build folder, the shipped one
  in ``polymodal/assets/toy``; the decoder manifest).

Rebuild everything (cached step by step; one torch thread; ~1.5 h on one core)::

    polymodal toyworld build --out runs/toy
    POLYMODAL_TOY_DIR=runs/toy polymodal serve --preset toy

Single steps::

    polymodal toyworld data --out toy/data --count 1200 --size-px 32 --layout canonical
    polymodal toyworld train-decoders --data toy/data --out toy/decoders
    polymodal toyworld score-decoder --out toy/decoders --modality image --n 48
"""
