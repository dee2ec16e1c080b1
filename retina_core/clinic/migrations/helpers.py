"""SQL the migrations share. Revisions already shipped call these: change their behaviour only through a new
function and a new revision."""
from alembic import op


def append_only(table: str, message: str, when: str = "TRUE") -> None:
    """A trigger refusing UPDATE and DELETE of `table`'s rows where `when` (an SQL condition on OLD) holds."""
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"""
            CREATE FUNCTION {table}_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF {when} THEN RAISE EXCEPTION '{message}'; END IF;
                IF TG_OP = 'DELETE' THEN RETURN OLD; END IF;
                RETURN NEW;
            END $$""")
        op.execute(f"CREATE TRIGGER {table}_immutable BEFORE UPDATE OR DELETE ON {table} "
                   f"FOR EACH ROW EXECUTE FUNCTION {table}_immutable()")
    elif op.get_bind().dialect.name == "sqlite":
        for what in ("UPDATE", "DELETE"):
            op.execute(f"CREATE TRIGGER {table}_immutable_{what.lower()} BEFORE {what} ON {table} "
                       f"WHEN {when} BEGIN SELECT RAISE(ABORT, '{message}'); END")


def drop_append_only(table: str) -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"DROP TRIGGER IF EXISTS {table}_immutable ON {table}")
        op.execute(f"DROP FUNCTION IF EXISTS {table}_immutable()")
    elif op.get_bind().dialect.name == "sqlite":
        for what in ("update", "delete"):
            op.execute(f"DROP TRIGGER IF EXISTS {table}_immutable_{what}")
