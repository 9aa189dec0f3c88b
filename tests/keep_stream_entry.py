"""A `launcher.entry` for tests: ebmscale's trainer, with every data stream it builds kept referenced until the
process exits, as a reference cycle anywhere in the job would keep it."""
from ebmscale.train import main as trainer_main

KEPT = []


def main(cfg):
    build = trainer_main.build_stream

    def build_and_keep(*args, **kwargs):
        KEPT.append(build(*args, **kwargs))
        return KEPT[-1]
    trainer_main.build_stream = build_and_keep
    return trainer_main.main(cfg)
