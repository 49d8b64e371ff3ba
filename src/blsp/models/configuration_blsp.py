"""``BlspConfig``: what a BLSP model is made of, saved as ``config.json`` beside the adapter."""

from __future__ import annotations

from transformers import PretrainedConfig

from blsp.models.hub import DEFAULT_LLM, DEFAULT_WHISPER


class BlspConfig(PretrainedConfig):
    """Configuration of a BLSP model.

    Args:
        encoder: Whisper reference (alias, hub id, HF folder or CTranslate2 folder).
        llm: LLM reference (alias, hub id, HF folder or ``.gguf`` file).
        adapter_kernel_sizes: kernel of each stride-``adapter_stride`` Conv1d of the adapter.
        adapter_stride: stride of each adapter convolution (2 in the paper: length / 8).
        adapter_bottleneck_dim: hidden width of the bottleneck (512 in the paper).
        adapter_init_scale: initial gain of the adapter's final LayerNorm: ``embeddings`` (the RMS
            of the LLM's token embeddings, so speech enters at the scale of text) or a number
            (the original's 1.0 gives speech vectors ~8x longer than SmolLM2's token embeddings).
        prompt_template: ``auto`` (the LLM's chat template if it has one), ``chat`` or ``paper``.
        instruction_separator: text between the instruction and the speech/transcript span.
        system_prompt: optional system message added to every conversation.
        encoder_dim, llm_dim: widths, filled in when the model is built and checked on load.
        ctc_vocab_size: size of an optional CTC head on the adapter output (the CTC baseline and
            the alignment warm start; ``blsp.models.ctc``), None for none.
        ctc_vocab: its labels, ``tokenizer``, ``chars`` or ``embeddings`` (``ctc.VOCAB_KINDS``).
        ctc_upsample: labels each adapter frame may emit.
        ctc_normalize: whether transcripts are normalised before they are encoded as labels.
    """

    model_type = "blsp"

    def __init__(
        self,
        encoder: str = DEFAULT_WHISPER,
        llm: str = DEFAULT_LLM,
        adapter_kernel_sizes: list[int] | tuple[int, ...] = (5, 5, 5),
        adapter_stride: int = 2,
        adapter_bottleneck_dim: int = 512,
        adapter_init_scale: str | float = "embeddings",
        prompt_template: str = "auto",
        instruction_separator: str = "\n",
        system_prompt: str | None = None,
        encoder_dim: int | None = None,
        llm_dim: int | None = None,
        ctc_vocab_size: int | None = None,
        ctc_vocab: str | None = None,
        ctc_upsample: int = 1,
        ctc_normalize: bool = True,
        **kwargs,
    ) -> None:
        self.encoder = encoder
        self.llm = llm
        self.adapter_kernel_sizes = list(adapter_kernel_sizes)
        self.adapter_stride = adapter_stride
        self.adapter_bottleneck_dim = adapter_bottleneck_dim
        self.adapter_init_scale = adapter_init_scale
        self.prompt_template = prompt_template
        self.instruction_separator = instruction_separator
        self.system_prompt = system_prompt
        self.encoder_dim = encoder_dim
        self.llm_dim = llm_dim
        self.ctc_vocab_size = ctc_vocab_size
        self.ctc_vocab = ctc_vocab
        self.ctc_upsample = ctc_upsample
        self.ctc_normalize = ctc_normalize
        super().__init__(**kwargs)
