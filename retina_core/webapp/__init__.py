"""The Streamlit glue of the app (app.py and app_pages/): the only part of retina_core that draws with Streamlit.

    common.py        what every page shares: models loaded once per server, the per-session result cache and the
                     inference service, bundled samples, the disclaimer, trust notes, image pickers, captions
    auth.py          who is signed in: sign-in, sign-out, roles, the My account page, page views to the audit trail
    clinic_pages.py  the clinic pages (worklist, case review) and "Save to worklist" on the reading pages

Pages stay thin: they lay out widgets and call these helpers and the retina_core API. What the pages compute
without Streamlit lives in the core (`analysis`, `attention_zones`, `compare_modalities`, `batch`, `figures`,
`audit.evidence`, `evaluate`), where the CLI and the tests use it too. Nothing in the core imports this package
(only app.py, the pages, their tests and the app benchmark `bench_app` do).
"""
