"""The clinic database on SQLite and PostgreSQL: migrations up, down and in place, nothing lost across a restart,
signed reviews and the audit trail immutable, concurrent writers keep each other's work, the worklist's filters,
change since the last visit, and the export that `train` reads."""
import datetime as dt
import threading

import pytest
import sqlalchemy as sa

from retina_core.clinic import ClinicConfig, db, open_clinic, records
from retina_core.clinic.export import export_labels
from retina_core.clinic.schema import Base, Case, ImmutableRecordError, Review
from retina_core.clinic.testing import synthetic_analysis, synthetic_image
from retina_core.errors import RetinaInputError

D1, D2 = dt.date(2026, 1, 10), dt.date(2026, 4, 10)
P_CNV = {"CNV": 0.7, "DME": 0.1, "DRUSEN": 0.1, "NORMAL": 0.1}
P_NORMAL = {"CNV": 0.05, "DME": 0.05, "DRUSEN": 0.1, "NORMAL": 0.8}


def save(clinic, ref, seed, probs=P_CNV, eye="OD", date=D1, **kw):
    img = synthetic_image(seed)
    return records.save_reading(clinic, case_ref=ref, eye=eye, visit_date=date, image=img,
                                analyses=[synthetic_analysis(img, probs)], actor="dr-a", **kw)


def tables(url):
    return db.table_names(url) - {"alembic_version"}


# ------------------------------------------------------------------------------------------------ migrations
def test_migrations_up_down_and_up_again(clinic_db_url):
    db.upgrade(clinic_db_url)
    assert db.current_revision(clinic_db_url) == db.HEAD
    assert tables(clinic_db_url) == set(Base.metadata.tables)
    db.downgrade(clinic_db_url, "base")
    assert db.current_revision(clinic_db_url) is None and tables(clinic_db_url) == set()
    db.upgrade(clinic_db_url)
    assert db.current_revision(clinic_db_url) == db.HEAD and tables(clinic_db_url) == set(Base.metadata.tables)


def test_migrated_schema_matches_the_models(clinic_db_url):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    db.upgrade(clinic_db_url)
    engine = sa.create_engine(db.normalise_url(clinic_db_url))
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    engine.dispose()
    assert diff == []


def test_database_at_first_revision_upgrades_in_place_keeping_rows(clinic_db_url, tmp_path):
    db.upgrade(clinic_db_url, "0001_initial")
    engine = sa.create_engine(db.normalise_url(clinic_db_url))
    created = dt.datetime(2026, 1, 2, 3, 4, 5)
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO cases (id, ref, created_at) VALUES (7, 'OLD-0007', :t)"), {"t": created})
        conn.execute(sa.text("INSERT INTO eyes (id, case_id, laterality) VALUES (3, 7, 'OS')"))
        conn.execute(sa.text("INSERT INTO audit_events (at, actor, action, object_type, object_id, details) "
                             "VALUES (:t, 'dr-old', 'case.create', 'case', 7, '{}')"), {"t": created})
    engine.dispose()
    clinic = open_clinic(ClinicConfig("dev", tmp_path / "data", clinic_db_url))    # upgrades to head
    try:
        assert db.current_revision(clinic_db_url) == db.HEAD
        with clinic.session() as s:
            case = s.get(Case, 7)
            assert case.ref == "OLD-0007" and [e.laterality for e in case.eyes] == ["OS"]
            assert case.last_activity_at.replace(tzinfo=None) == created       # back-filled from created_at
        saved = save(clinic, "OLD-0007", 1, eye="OS")                           # the old case takes new readings
        assert saved.case_id == 7
        assert records.audit_trail(clinic)[-1]["actor"] == "dr-old"
    finally:
        clinic.dispose()


# ------------------------------------------------------------------------------------------------ persistence
def test_nothing_lost_across_a_restart(clinic_db_url, tmp_path):
    cfg = ClinicConfig("dev", tmp_path / "data", clinic_db_url)
    first = open_clinic(cfg)
    img = synthetic_image(5)
    a = synthetic_analysis(img, P_CNV)
    saved = records.save_reading(first, case_ref="SCR-0042", eye="OD", visit_date=D1, image=img, analyses=[a],
                                 actor="dr-a")
    records.save_review(first, saved.analysis_ids[0], "corrected", corrected_label="DME", comment="fluid",
                        reviewer="dr-a", sign=True)
    first.dispose()                                                  # the server stops

    again = open_clinic(cfg)                                         # and starts: a new engine, the same files
    try:
        view = records.case_view(again, saved.case_id)
        (stored,) = view.analyses()
        assert (view.ref, stored.label, stored.probabilities, stored.model) == ("SCR-0042", "CNV", P_CNV,
                                                                                 "oct_resnet18")
        assert stored.signed_review.label == "DME" and stored.signed_review.comment == "fluid"
        assert stored.signed_review.signed_at.tzinfo is not None
        image = view.eyes[0].visits[0].images[0]
        assert (again.store.get_image(image.stored_hash) == img.pixels).all()        # lossless, metadata-free PNG
        hm = again.store.get_heatmap(stored.heatmap_hash, img.pixels.shape[:2])
        assert hm.shape == a.heatmap.shape and abs(hm - a.heatmap).max() < 0.02
        assert [e["action"] for e in records.audit_trail(again)][::-1] == ["case.create", "reading.save",
                                                                            "review.sign"]
    finally:
        again.dispose()


def test_saving_the_same_reading_twice_adds_nothing(clinic):
    first = save(clinic, "SCR-0001", 1)
    second = save(clinic, "SCR-0001", 1)
    assert first.analysis_ids == second.analysis_ids and second.new_analyses == 0
    assert len(records.case_view(clinic, first.case_id).analyses()) == 1


# ------------------------------------------------------------------------------------------------ reviews
def test_a_signed_review_is_immutable_and_a_change_is_a_new_version(clinic):
    aid = save(clinic, "SCR-0002", 2).analysis_ids[0]
    v1 = records.save_review(clinic, aid, "agree", reviewer="dr-a", sign=True)
    with pytest.raises(ImmutableRecordError):                        # through the ORM: refused before any SQL
        with clinic.writing() as s:
            s.get(Review, v1.review_id).comment = "edited"
    with pytest.raises(ImmutableRecordError):
        with clinic.writing() as s:
            s.delete(s.get(Review, v1.review_id))
    for sql in ("UPDATE reviews SET decision = 'disagree'", "DELETE FROM reviews"):   # by hand: the trigger refuses
        with pytest.raises(sa.exc.DatabaseError, match="immutable"):
            with clinic.engine.begin() as conn:
                conn.execute(sa.text(sql))
    v2 = records.save_review(clinic, aid, "corrected", corrected_label="DME", reviewer="dr-b", sign=True,
                             based_on_version=1)
    assert (v2.version, v2.conflict) == (2, False)
    (a,) = records.case_view(clinic, records.find_case(clinic, "SCR-0002")).analyses()
    assert [(r.version, r.decision, r.reviewer) for r in a.reviews] == [(1, "agree", "dr-a"),
                                                                        (2, "corrected", "dr-b")]
    assert a.signed_review.label == "DME"


def test_the_audit_trail_is_append_only(clinic):
    save(clinic, "SCR-0003", 3)
    for sql in ("UPDATE audit_events SET actor = 'someone else'", "DELETE FROM audit_events"):
        with pytest.raises(sa.exc.DatabaseError, match="append-only"):
            with clinic.engine.begin() as conn:
                conn.execute(sa.text(sql))


def test_review_input_is_checked(clinic):
    aid = save(clinic, "SCR-0004", 4).analysis_ids[0]
    with pytest.raises(RetinaInputError, match="not one of"):
        records.save_review(clinic, aid, "corrected", corrected_label="GLAUCOMA", reviewer="dr-a")
    with pytest.raises(RetinaInputError, match="needs the grade"):
        records.save_review(clinic, aid, "corrected", reviewer="dr-a")
    with pytest.raises(RetinaInputError, match="name or staff code"):
        records.save_review(clinic, aid, "agree", reviewer="  ")


def test_concurrent_reviewers_of_one_analysis_keep_each_others_work(clinic):
    aid = save(clinic, "SCR-0005", 5).analysis_ids[0]
    barrier, errors, results = threading.Barrier(2), [], []

    def reviewer(name):
        try:
            barrier.wait()
            for k in range(4):
                results.append(records.save_review(clinic, aid, "agree", reviewer=name, comment=f"{name} {k}",
                                                   sign=True, based_on_version=None))
        except Exception as exc:      # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=reviewer, args=(n,)) for n in ("dr-a", "dr-b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    (a,) = records.case_view(clinic, records.find_case(clinic, "SCR-0005")).analyses()
    assert [r.version for r in a.reviews] == list(range(1, 9))
    assert sorted(r.comment for r in a.reviews) == sorted(f"{n} {k}" for n in ("dr-a", "dr-b") for k in range(4))
    assert sum(r.conflict for r in results) == 7        # every save after the first was based on an older version


def test_concurrent_first_saves_of_one_case_make_one_case(clinic):
    barrier, errors, saved = threading.Barrier(2), [], []

    def saver(seed):
        try:
            barrier.wait()
            saved.append(save(clinic, "SCR-0006", seed))
        except Exception as exc:      # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=saver, args=(s,)) for s in (61, 62)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len({s.case_id for s in saved}) == 1
    assert len(records.case_view(clinic, saved[0].case_id).eyes[0].visits[0].images) == 2


# ------------------------------------------------------------------------------------------------ worklist
def test_worklist_filters_and_order(clinic):
    a = save(clinic, "SCR-0010", 10, P_CNV, date=D1)                 # referable, awaiting
    b = save(clinic, "SCR-0011", 11, P_NORMAL, date=D2)              # not referable, reviewed by dr-b
    c = save(clinic, "SCR-0012", 12, P_CNV, date=D2)                 # referable, reviewed by dr-c
    records.save_review(clinic, b.analysis_ids[0], "agree", reviewer="dr-b", sign=True)
    records.save_review(clinic, c.analysis_ids[0], "agree", reviewer="dr-c", sign=True)
    records.save_review(clinic, a.analysis_ids[0], "agree", reviewer="dr-b", sign=False)     # a draft: still awaiting

    def refs(**kw):
        return [r.ref for r in records.worklist(clinic, **kw)]

    assert refs() == ["SCR-0012", "SCR-0010", "SCR-0011"]           # referable first, newest visit first within
    assert refs(referable_first=False) == ["SCR-0012", "SCR-0011", "SCR-0010"]
    assert refs(awaiting_only=True) == ["SCR-0010"]
    assert refs(date_from=D2) == ["SCR-0012", "SCR-0011"] and refs(date_to=D1) == ["SCR-0010"]
    assert refs(reviewer="DR-B") == ["SCR-0011"]                      # a signed review; drafts do not count
    assert records.reviewers(clinic) == ["dr-b", "dr-c"]
    row = records.worklist(clinic, awaiting_only=True)[0]
    assert row.referable and row.status == "awaiting review (1 of 1)" and row.eyes == ("OD",)
    # readings below their model's confident level are counted for the latest visit
    assert row.low_confidence == 0
    save(clinic, "SCR-0010", 13, {"CNV": 0.45, "DME": 0.35, "DRUSEN": 0.1, "NORMAL": 0.1}, date=D2)
    row = next(r for r in records.worklist(clinic) if r.ref == "SCR-0010")
    assert row.low_confidence == 1 and row.visits == 2


def test_change_since_last_visit(clinic):
    save(clinic, "SCR-0020", 20, P_NORMAL, date=D1)
    second = save(clinic, "SCR-0020", 21, P_CNV, date=D2)
    (eye,) = records.case_view(clinic, second.case_id).eyes
    assert [v.visit_date for v in eye.visits] == [D1, D2]
    (change,) = eye.changes
    assert (change.before_label, change.after_label, change.referable_before, change.referable_after) == (
        "NORMAL", "CNV", False, True)
    assert change.before_p == pytest.approx(0.05) and change.after_p == pytest.approx(0.7)
    assert "NORMAL -> CNV" in change.text and "+65 points" in change.text and "now referable" in change.text


# ------------------------------------------------------------------------------------------------ export
def test_export_of_signed_reviews_is_a_labels_set_that_train_reads(clinic, tmp_path):
    from retina_core.io.datasets import load_dataset

    agree = save(clinic, "SCR-0030", 30, P_CNV)
    corrected = save(clinic, "SCR-0031", 31, P_CNV, eye="OS")
    disagree = save(clinic, "SCR-0032", 32, P_NORMAL)
    draft = save(clinic, "SCR-0033", 33, P_NORMAL)
    records.save_review(clinic, agree.analysis_ids[0], "agree", reviewer="dr-a", sign=True)
    records.save_review(clinic, corrected.analysis_ids[0], "agree", reviewer="dr-a", sign=True)
    records.save_review(clinic, corrected.analysis_ids[0], "corrected", corrected_label="DRUSEN", reviewer="dr-b",
                        sign=True)                                   # the newest signed version wins
    records.save_review(clinic, disagree.analysis_ids[0], "disagree", reviewer="dr-a", sign=True)
    records.save_review(clinic, draft.analysis_ids[0], "agree", reviewer="dr-a", sign=False)
    summary = export_labels(clinic, tmp_path / "export", model="oct_resnet18", actor="test")
    assert summary.counts == {"oct_resnet18": {"CNV": 1, "DRUSEN": 1}}
    idx = load_dataset(tmp_path / "export")
    assert idx.layout == "labels" and sorted(r.label for r in idx.records) == ["CNV", "DRUSEN"]
    assert {r.eye for r in idx.records} == {"OD", "OS"} and len({r.patient_id for r in idx.records}) == 2
    text = (tmp_path / "export" / "labels.csv").read_text()
    assert "SCR-00" not in text and "dr-" not in text                # no case reference, no reviewer
    assert records.audit_trail(clinic)[0]["action"] == "export.labels"
