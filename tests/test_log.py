"""ebmscale.log: one configuration point; timestamps and rank@host prefixes; ranks other than 0 quiet but for warnings."""
import re
import socket
import warnings

from ebmscale.log import get_logger, setup
from ebmscale.train.main import quiet_unactionable_warnings


def test_rank_prefix_timestamps_and_quiet_ranks(capsys, monkeypatch):
    log = get_logger("ebmscale.test")
    setup(0)
    log.info("hello")
    log.warning("careful")
    out, err = capsys.readouterr()
    host = socket.gethostname()
    assert re.fullmatch(rf"\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d r0@{host} \[ebmscale\] hello\n", out)
    assert err.endswith(f"r0@{host} [ebmscale] careful\n")
    setup(1)
    log.info("only on rank 0")
    log.warning("seen on every rank")
    out, err = capsys.readouterr()
    assert out == "" and err.endswith(f"r1@{host} [ebmscale] seen on every rank\n")
    monkeypatch.setenv("EBMSCALE_LOG_RANKS", "all")
    setup(1)
    log.info("now shown")
    assert capsys.readouterr().out.endswith("r1@" + host + " [ebmscale] now shown\n")
    setup(0)


def test_data_modules_log_through_it(capsys):
    import logging
    setup(0)
    logging.getLogger("ebmscale.data").warning("a corrupt sample")  # data/stream.py's logger was never configured
    assert "[ebmscale] a corrupt sample" in capsys.readouterr().err


def test_only_the_unactionable_warning_is_quiet():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_unactionable_warnings()
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Please use ...", FutureWarning)
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Please use ...", UserWarning)
        warnings.warn("`torch.distributed.something_else` is deprecated.", FutureWarning)
    assert [(w.category, str(w.message).split(" ")[0]) for w in seen] == [
        (UserWarning, "`torch.distributed.all_gather_into_tensor`"), (FutureWarning, "`torch.distributed.something_else`")]
