"""Speech data: one JSONL manifest format, importers, checks, synthetic corpora, mixtures.

- :mod:`blsp.data.manifest` - the manifest format (``id``, ``audio``, ``text``, ``duration``, ...),
  ``read_manifest``, ``write_manifest``, ``resolve_audio_path``.
- :mod:`blsp.data.audio` - ``load_audio(ref, sr=16000)`` for any soundfile format and segments.
- :mod:`blsp.data.importers` - LibriSpeech, Common Voice, GigaSpeech, Kaldi, manifest, ``datasets``,
  TSV/CSV.
- :mod:`blsp.data.check` - the per-utterance checks every job uses (``check_utterance``,
  ``iter_good``) and ``blsp data check``.
- :mod:`blsp.data.synth` - ``synthesize(items, out_dir, voices)`` with piper, flite, espeak-ng.
- :mod:`blsp.data.mix` - deterministic weighted mixtures.
- :mod:`blsp.data.normalize` - transcript normalisers (Whisper's English normaliser offline).

Nothing heavy is imported here.
"""
