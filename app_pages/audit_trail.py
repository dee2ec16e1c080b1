"""Audit trail (admin): who signed in, viewed, analysed, saved, reviewed, signed and exported what, newest first.
Events hold ids, hashes, labels and counts, never patient identifiers or free text."""
import json

import pandas as pd
import streamlit as st

from retina_core.clinic import records
from retina_core.webapp import auth, clinic_pages

auth.require("audit", "The audit trail")
st.title("Audit trail")
clinic = clinic_pages.clinic_or_stop()
auth.audit_view("view.audit_trail", "audit")

FAMILIES = {"Everything": None, "Sign-in": "login", "Sessions ended": "session.", "Sign-out": "logout",
            "Page views": "view.", "Analyses": "analysis.", "Readings saved": "reading.", "Reviews": "review.",
            "Exports": "export", "Accounts": "user."}
c1, c2, c3 = st.columns([1.3, 1, 0.7])
family = c1.selectbox("What", list(FAMILIES), key="trail_family")
who = c2.text_input("User name (exact)", key="trail_user")
limit = c3.number_input("Newest", 50, 5000, 500, 50, key="trail_limit")
events = records.audit_trail(clinic, limit=int(limit), actor=who.strip().lower() or None,
                             action=FAMILIES[family])
if not events:
    st.info("No event matches.", icon=":material/inbox:")
    st.stop()
st.dataframe(pd.DataFrame([{
    "When (UTC)": f"{e['at']:%Y-%m-%d %H:%M:%S}", "User": e["actor"], "Account id": e["user_id"],
    "Action": e["action"], "Object": f"{e['object_type']} {e['object_id'] if e['object_id'] is not None else ''}",
    "Details": json.dumps(e["details"], default=str)} for e in events]), hide_index=True, width="stretch",
    key="trail_table")
st.caption(f"{len(events)} event(s). The trail is append-only: the database refuses updates and deletes.")
