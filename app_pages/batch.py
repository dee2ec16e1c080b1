"""Batch screening: many images in, one row each (modality, quality, suggestion, probabilities), a CSV out."""
import pandas as pd
import streamlit as st

from retina_core.batch import COLUMNS, screen_uploads
from retina_core.io.decode import IMAGE_EXTENSIONS
from retina_core.webapp import auth, common

CHUNK = 8   # images per forward batch; the progress bar moves after each

st.title("Batch screening")
common.disclaimer()
st.markdown("Upload many fundus photographs and OCT B-scans at once. Each gets the quality gate and, when "
            "gradable, the default model of its modality with Grad-CAM; unreadable files become rows with the "
            "reason, and nothing stops the batch.")

uploads = st.file_uploader("Images to screen (PNG, JPEG, TIFF, BMP, DICOM)", accept_multiple_files=True,
                           type=list(IMAGE_EXTENSIONS), key="batch_upload")
if not uploads:
    st.info("Select several files (Ctrl/Shift-click) or drag a set of images here, then press **Screen**. "
            "The results table and a CSV download appear below.", icon=":material/arrow_upward:")
    st.stop()

files = [(f.name, f.getvalue()) for f in uploads]
key = common.batch_key(files)
done = st.session_state.get("_batch", {}).get(key)
if done is None:
    if not st.button(f"Screen {len(files)} image(s)", type="primary", key="batch_run", icon=":material/play_arrow:"):
        st.stop()
    bar = st.progress(0.0, text="Screening...")
    done = screen_uploads(files, chunk=CHUNK,
                          progress=lambda k, n: bar.progress(k / n, text=f"Screened {k} of {n} images"))
    bar.progress(1.0, text=f"Screened {len(files)} images")
    st.session_state["_batch"] = {key: done}      # one batch kept per session
    auth.audit_view("analysis.batch", "batch", None, images=len(done),
                    content_hashes=[r["content_hash"] for r in done if r.get("content_hash")])

table = pd.DataFrame(done, columns=COLUMNS)
n_err = int((table["error"] != "").sum())
n_ref = int((table["referable"].astype(str) == "True").sum())
n_nores = int((table["label"] == "no result").sum())
n_unsure = int(((table["label"] != "no result") & (table["model"] != "")
                & (table["confident"].astype(str) == "False")).sum())
c = st.columns(5)
c[0].metric("Images", len(table))
c[1].metric("Referable", n_ref)
c[2].metric("Below the confident level", n_unsure, help="Readings whose top-class probability is below the level at "
            "which the model's held-out readings were right 90% of the time (Models & evaluation page); review "
            "these images yourself.")
c[3].metric("No result (retake or refer)", n_nores)
c[4].metric("Unreadable files", n_err)
show = table[["file", "modality", "quality", "label", "confidence", "confident", "referable", "model", "error"]]
st.dataframe(show, hide_index=True, width="stretch",
             column_config={"confidence": st.column_config.ProgressColumn("confidence", min_value=0.0,
                                                                          max_value=1.0, format="%.2f")})
st.download_button("Download results (CSV)", table.to_csv(index=False).encode("utf-8"),
                   file_name="screening_results.csv", mime="text/csv", key="batch_csv", icon=":material/download:")
st.caption("The CSV has one row per file with all probabilities (JSON) and the image's content hash; it holds the "
           "file names you uploaded, so store it as you would the images.")
common.weights_caption(sorted({m for m in table["model"] if m}) or None)
