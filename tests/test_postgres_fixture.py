import sqlalchemy


def test_postgres_fixture_serves_a_fresh_database(postgres_db: str) -> None:
    engine = sqlalchemy.create_engine(postgres_db)
    with engine.connect() as conn:
        assert conn.execute(sqlalchemy.text("select version()")).scalar().startswith("PostgreSQL 15")
        assert conn.execute(sqlalchemy.text("select count(*) from pg_tables where schemaname='public'")).scalar() == 0
    engine.dispose()
