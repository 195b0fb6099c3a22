"""Regional compilation (``train.compile=blocks``), for the engine and the micro-batch finder."""

from __future__ import annotations

from torch import nn

from umbrella_ds.model import transformer_blocks


def compile_blocks(model: nn.Module, zero3: bool = False) -> int:
    """Regional compilation (``train.compile=blocks``): ``module.compile()`` on every block.

    Compiling blocks, not the whole model, keeps compile time to one graph per block type and
    leaves the host-built index gathers, the per-modality loop and DeepSpeed's engine eager.
    Call it after the model is built and before ``deepspeed.initialize``.

    ZeRO-3 registers parameter-gathering hooks on every submodule; inside a compiled block each
    of them is a graph break (they are ``torch.compiler.disable``d) and the NVTX-wrapped
    post-forward hook makes dynamo recompile until it hits its recompile limit. So under ZeRO-3
    each block is declared a ZeRO-3 *leaf module*: its parameters are gathered once at block
    entry and released at exit, hooks sit only on the block, and the block body compiles as one
    graph. NVTX ranges are switched off, as ``DeepSpeedEngine.compile`` does, for the same reason.
    Returns the number of blocks compiled.
    """
    blocks = transformer_blocks(model)
    if not blocks:
        raise RuntimeError("train.compile=blocks: found no transformer blocks to compile")
    if next(model.parameters()).device.type == "cpu":
        _avoid_avx512_codegen()
    if zero3:
        import deepspeed.utils.nvtx
        from deepspeed.utils import set_z3_leaf_modules

        deepspeed.utils.nvtx.enable_nvtx = False
        set_z3_leaf_modules(model, sorted({type(b) for b in blocks}, key=lambda t: t.__name__))
    for block in blocks:
        block.compile()
    return len(blocks)


def _avoid_avx512_codegen() -> None:
    """CPU runs (tests, the demo) compile with AVX2-width vectors, not AVX-512.

    Measured on an Intel Xeon with AVX512-BF16 and AMX (torch 2.13.0, inductor's C++ backend): a
    compiled SigLIP encoder block returns NaN in bf16 where eager does not; each of its
    submodules compiled alone is correct, and the whole block is correct with ``simdlen=256``
    (and on the AMD EPYC machines without AVX512-BF16 this project ran on before). GPU runs use
    Triton and are not affected. A simdlen set explicitly is left alone.
    """
    import torch._inductor.config as inductor_config

    if inductor_config.cpp.simdlen is None:
        inductor_config.cpp.simdlen = 256
