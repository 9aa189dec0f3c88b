"""Property-based tests (hypothesis) of every reader of untrusted input owned by the trust model: tar members and
headers, spool records, an exported config.json, config overrides, secret redaction. Each property is what the
reader promises for ANY input: it returns something within its bounds or refuses with its own error, and touches
nothing outside its folder. (trainer.json / COMMITTED belong to the checkpoint format being changed in parallel:
not covered here.) Small example counts and a deadline: CI has 2 cores."""
import io
import json
import string
import tarfile

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ebmscale import trust
from ebmscale.config import ConfigError, load_config
from ebmscale.data.shards import MAX_HEADER_BYTES, MEMBER_SLOTS, USED_KEYS, tar_samples
from ebmscale.tracking.spool import Spool
from ebmscale.trust import Untrusted

FAST = settings(max_examples=80, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                      HealthCheck.too_slow])
CAP = 256  # data.max_member_bytes in these tars

# ---- tar members and headers ------------------------------------------------------------------------------------
names = st.builds(lambda base, ext, deep: ("x" * deep + "/" if deep else "") + base + ext,
                  st.text(alphabet="abc_./", min_size=0, max_size=6),
                  st.sampled_from(["", ".png", ".cls", ".json", ".txt", ".PNG", ".seg.png", ".pyd", "."]),
                  st.sampled_from([0, 0, 0, 120, 300]))  # 120/300: past ustar's 100 bytes -> pax / GNU long names
member = st.tuples(names, st.integers(0, 3 * CAP),
                   st.sampled_from([tarfile.REGTYPE, tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE]),
                   st.dictionaries(st.sampled_from(["comment", "x.y"]), st.text(max_size=50), max_size=2))


def _tar(members, fmt) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
        for name, size, kind, pax in members:
            ti = tarfile.TarInfo(name)
            ti.type = kind
            if kind == tarfile.SYMTYPE:
                ti.linkname = "../../etc/passwd"
            ti.size = size if kind == tarfile.REGTYPE else 0
            if fmt == tarfile.PAX_FORMAT:
                ti.pax_headers = pax
            t.addfile(ti, io.BytesIO(b"\x01" * ti.size))
    return buf.getvalue()


@FAST
@given(st.lists(member, max_size=12), st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT]),
       st.lists(st.tuples(st.integers(0, 20000), st.integers(0, 255)), max_size=3))
def test_tar_samples_stay_within_their_bounds(tmp_path_factory, members, fmt, flips):
    data = bytearray(_tar(members, fmt))
    for pos, byte in flips:  # corrupt a few bytes anywhere (headers included)
        if data:
            data[pos % len(data)] = byte
    path = tmp_path_factory.mktemp("tar") / "s.tar"
    path.write_bytes(bytes(data))
    try:
        samples = list(tar_samples(str(path), CAP))
    except (tarfile.TarError, EOFError, OSError, UnicodeError):
        return  # an unreadable shard: the stream logs it and goes on
    for s in samples:
        read = {k: v for k, v in s.items() if not k.startswith("__")}
        assert set(read) <= USED_KEYS, read.keys()
        assert all(len(v) <= CAP for v in read.values())
        assert sum(map(len, read.values())) <= MEMBER_SLOTS * CAP
        assert s["__key__"] and "/" not in s["__key__"].rsplit("/", 1)[-1]


@settings(max_examples=15, deadline=5000)
@given(st.integers(MAX_HEADER_BYTES + 1, 4 * MAX_HEADER_BYTES), st.sampled_from(["pax", "gnu", "global"]))
def test_an_oversized_extended_header_is_refused_unread(tmp_path_factory, size, kind):
    buf = io.BytesIO()
    fmt = tarfile.GNU_FORMAT if kind == "gnu" else tarfile.PAX_FORMAT
    with tarfile.open(fileobj=buf, mode="w", format=fmt,
                      pax_headers={"comment": "A" * size} if kind == "global" else None) as t:
        ti = tarfile.TarInfo(("d" * size + "/" if kind == "gnu" else "") + "k.cls")
        if kind == "pax":
            ti.pax_headers = {"comment": "A" * size}
        ti.size = 1
        t.addfile(ti, io.BytesIO(b"1"))
    path = tmp_path_factory.mktemp("hdr") / "s.tar"
    path.write_bytes(buf.getvalue())
    with pytest.raises(tarfile.HeaderError, match="extended tar header"):
        list(tar_samples(str(path), CAP))


# ---- spool records ----------------------------------------------------------------------------------------------
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) |
                           st.text(max_size=20), lambda c: st.lists(c, max_size=3) |
                           st.dictionaries(st.text(max_size=8), c, max_size=3), max_leaves=8)
files = st.one_of(st.text(max_size=40), st.sampled_from(["files/0123456789ab/x", "files/0123456789ab/../../../o/v",
                                                         "/etc/passwd", "files/zz/x", "files/0123456789ab/..",
                                                         "files/0123456789ab/x/y", "files/aaaaaaaaaaaa/.."]))
records = st.one_of(json_values, st.fixed_dictionaries(
    {"op": st.sampled_from(["start", "metrics", "tags", "image", "artifact", "text", "end", "rm"])},
    optional={"file": files, "m": json_values, "step": json_values, "ts": json_values, "key": json_values,
              "tags": json_values, "params": json_values, "run_name": json_values, "status": json_values,
              "artifact_path": st.one_of(st.none(), files), "artifact_file": files, "text": json_values}))


@FAST
@given(records)
def test_spool_records_are_refused_or_name_a_file_in_the_spool(tmp_path_factory, record):
    tmp = tmp_path_factory.mktemp("spool")
    outside = tmp / "o" / "v"
    outside.mkdir(parents=True)
    spool = Spool(tmp / "run" / "tracking_spool")
    (spool.root / "files" / "0123456789ab").mkdir()
    (spool.root / "files" / "aaaaaaaaaaaa").symlink_to(tmp / "o")
    try:
        trust.spool_record(spool.root, record)
        ok = True
    except Untrusted:
        ok = False
    if ok and "file" in record:
        assert (spool.root / "files").resolve() in spool.file(record["file"]).parents
    if isinstance(record, dict) and "file" in record:
        spool.discard(record["file"])  # never removes anything outside files/
    assert outside.is_dir()
    spool.close()


@FAST
@given(st.lists(st.one_of(records.map(json.dumps), st.text(max_size=30)), max_size=8))
def test_spool_reads_any_jsonl_as_dict_records(tmp_path_factory, lines):
    root = tmp_path_factory.mktemp("spool") / "s"
    root.mkdir()
    (root / "spool.jsonl").write_text("".join(ln.replace("\n", " ") + "\n" for ln in lines))
    s = Spool(root)
    assert all(isinstance(r, dict) for _, r in s.records(start=0))
    s.close()


# ---- an exported config.json --------------------------------------------------------------------------------------
model_sections = st.fixed_dictionaries({}, optional={
    "arch": st.sampled_from(["resnet32", "resnet128", "nope", 3]), "filters": st.one_of(st.integers(-2, 64),
                                                                                         st.text(max_size=3)),
    "in_channels": st.integers(0, 4), "resolution": st.sampled_from([0, 16, 31, 32, 64]),
    "num_classes": st.integers(-1, 10), "allow_pipe": st.booleans(), "activation": st.text(max_size=6)})


@FAST
@given(st.one_of(json_values, st.fixed_dictionaries({"model": st.one_of(model_sections, json_values)},
                                                    optional={"sampler": json_values, "recipe": json_values,
                                                              "data": json_values, "ebmscale": json_values})))
def test_exported_config_json_is_valid_or_refused(tmp_path_factory, meta):
    from ebmscale.models.pretrained import model_config as _model_config
    folder = tmp_path_factory.mktemp("export")
    (folder / "config.json").write_text(json.dumps(meta))
    try:
        m = _model_config(folder, trust.exported_config(folder))
    except Untrusted:
        return
    assert m.filters > 0 and m.in_channels in (1, 3) and m.resolution % 8 == 0
    assert "data" not in trust.exported_config(folder)  # only the sections an export writes are read


# ---- config overrides (key=value from a command line or a launcher) ------------------------------------------------
keys = st.sampled_from(["train.steps", "data.shards", "model.filters", "run.dir", "nope", "data", "launcher.setup",
                        "guard.remedies", "model", "tracking.uri", "a.b.c", ""])
values = st.one_of(st.text(max_size=12), st.sampled_from(["[1,2]", "{a: 1}", "null", "${oops}", "'", "1e400",
                                                          "[", "${data.shards}", "true", "-3"]))


@settings(max_examples=40, deadline=5000)
@example(["train.steps=${oops}"])
@example(["train.steps='"])
@example(["launcher.setup={}"])
@given(st.lists(st.builds(lambda k, v, eq: f"{k}{'=' if eq else ''}{v}", keys, values, st.booleans()), max_size=3))
def test_config_overrides_merge_or_fail_with_a_config_error(overrides):
    try:
        load_config("digits", overrides)
    except ConfigError as e:
        assert str(e)


# ---- redaction ----------------------------------------------------------------------------------------------------
secret = st.text(alphabet=string.ascii_letters + string.digits + "%+-_~", min_size=6, max_size=20)  # URI-safe


@FAST
@given(secret, st.sampled_from(["http://u:{}@h:5000/p", "https://{}@github.com/x", "s3://b/k?X-Amz-Signature={}",
                                "https://h/x.tar?a=1&token={}&b=2", "export MY_API_KEY={}", "--password={} x",
                                "postgresql://ebm:{}@db/mlflow"]), st.text(max_size=10))
def test_redact_never_shows_the_secret_and_is_idempotent(value, template, around):
    text = around + " " + template.format(value)
    once = trust.redact_text(text)
    assert value not in once.replace(around, "") and trust.redact_text(once) == once
