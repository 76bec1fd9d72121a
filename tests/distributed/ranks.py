"""What each rank of the gloo tests runs (module-level, importable by name in a spawned child)."""

from __future__ import annotations

import os


def _subject(name: str):
    from tests.engines.subjects import block_net, plain_net, token_net

    return {"plain": plain_net, "block": block_net, "token": token_net}[name]()


def anp_masks(rank: int, world: int, subject: str, kinds: tuple[str, ...], batch_size: int, interpret: bool):
    """The masks and losses of a small ANP run on this rank."""
    import fastpurify
    from tests.engines.subjects import clean_set

    os.environ["FASTPURIFY_BACKEND"] = "triton" if interpret else "torch"
    result = fastpurify.anp(_subject(subject), clean_set(16), device="cpu", mask_layers=kinds, iterations=4,
                            batch_size=batch_size, seed=2, progress=False)
    return {k: v.clone() for k, v in result.masks.items()}, result.loss, result.engine["world_size"]


def pbe_run(rank: int, world: int, subject: str, progressive: bool, micro_batch):
    """The purified parameters and buffers (and the progressive run's ranking) on this rank."""
    import fastpurify
    from tests.engines.subjects import clean_set

    os.environ["FASTPURIFY_BACKEND"] = "torch"
    data = clean_set(16)
    kw = dict(adv_epochs=1, clean_epochs=1, batch_size=8, eps=8 / 255, pgd_steps=2, progress=False, seed=1,
              device="cpu", micro_batch=micro_batch, random_start=True)
    if progressive:
        model, report = fastpurify.pbe(_subject(subject), train_data=clean_set(20, seed=5), schedule=(0.4, 0.8), **kw)
    else:
        model, report = fastpurify.pbe(_subject(subject), clean_data=data, **kw)
    ranking = None if report.ranking is None else report.ranking.clone()
    return {k: v.clone() for k, v in model.state_dict().items()}, ranking


def pgd_run(rank: int, world: int):
    import fastpurify
    from tests.engines.subjects import clean_set

    os.environ["FASTPURIFY_BACKEND"] = "torch"
    images, labels = clean_set(7)
    return fastpurify.pgd(_subject("block").eval(), images, labels, steps=2, seed=3, batch_size=2)


def cli(rank: int, world: int, argv: list[str]):
    """The command line on this rank (under the harness's process group); its exit status."""
    from fastpurify.cli import main

    os.environ["FASTPURIFY_BACKEND"] = "torch"
    return main(argv)
