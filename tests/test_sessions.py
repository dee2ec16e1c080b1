"""Two app sessions in one server process share the model copy but never each other's images or results."""
from pathlib import Path

from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parents[1] / "app.py")


def test_two_sessions_never_see_each_others_results(oct_png, fundus_png):
    first, second = AppTest.from_file(APP, default_timeout=240), AppTest.from_file(APP, default_timeout=240)
    first.run()
    second.run()
    first.file_uploader(key="upload").set_value((oct_png.name, oct_png.read_bytes(), "image/png")).run()
    second.file_uploader(key="upload").set_value((fundus_png.name, fundus_png.read_bytes(), "image/png")).run()
    first.run()   # a rerun after the other session worked
    assert not first.exception and not second.exception
    m1 = {m.label: m.value for m in first.metric}
    m2 = {m.label: m.value for m in second.metric}
    assert m1["Modality"] == "oct" and m2["Modality"] == "fundus"
    hashes1 = {k[0] for k in first.session_state["_analyses"]}
    hashes2 = {k[0] for k in second.session_state["_analyses"]}
    assert len(hashes1) == len(hashes2) == 1 and hashes1.isdisjoint(hashes2)
    text2 = "\n".join(str(e.value) for e in [*second.markdown, *second.caption, *second.subheader])
    assert oct_png.name not in text2 and next(iter(hashes1))[:16] not in text2
