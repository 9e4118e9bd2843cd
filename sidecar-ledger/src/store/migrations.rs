//! The schema's versions, one list for both dialects: version N is `NNNN_name.sql` in
//! `migrations/sqlite/` and in `migrations/postgres/`, the same change written for each.
//! SQLite records how many have run in `PRAGMA user_version`, PostgreSQL each one in
//! `schema_migrations`; both apply the versions after the last recorded, in order.

pub(super) struct Migration {
    pub version: i64,
    pub name: &'static str,
    pub sqlite: &'static str,
    pub postgres: &'static str,
}

/// A version whose file is missing in either dialect does not compile.
macro_rules! migration {
    ($version:literal, $name:literal) => {
        Migration {
            version: $version,
            name: $name,
            sqlite: include_str!(concat!("migrations/sqlite/", $name, ".sql")),
            postgres: include_str!(concat!("migrations/postgres/", $name, ".sql")),
        }
    };
}

pub(super) const MIGRATIONS: &[Migration] = &[
    migration!(1, "0001_initial"),
    migration!(2, "0002_money"),
    migration!(3, "0003_buyers"),
    migration!(4, "0004_journal"),
    migration!(5, "0005_charges"),
    migration!(6, "0006_refusals"),
    migration!(7, "0007_revocations"),
    migration!(8, "0008_x402_payments"),
    migration!(9, "0009_buyer_keys"),
];

#[cfg(test)]
mod tests {
    use super::*;

    fn files(dialect: &str) -> Vec<String> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("src/store/migrations")
            .join(dialect);
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .collect();
        files.sort();
        files
    }

    /// Both dialects have the same `NNNN_name.sql` files, numbered 1, 2, … without a gap,
    /// and every one is listed (one left out would never run) and applied in order.
    #[test]
    fn both_dialects_list_and_apply_the_same_numbered_migrations() {
        let listed: Vec<String> = MIGRATIONS.iter().map(|m| format!("{}.sql", m.name)).collect();
        assert_eq!(files("sqlite"), listed);
        assert_eq!(files("postgres"), listed);
        for (i, migration) in MIGRATIONS.iter().enumerate() {
            assert_eq!(migration.version, i64::try_from(i + 1).unwrap());
            assert!(migration.name.starts_with(&format!("{:04}_", migration.version)));
        }
        // SQLite applies every one (PostgreSQL's are applied by each API test on it).
        let dir = tempfile::tempdir().unwrap();
        let store = super::super::SqliteStore::open(&dir.path().join("ledger.db"));
        assert!(store.is_ok(), "SQLite did not apply its migrations");
        let conn = rusqlite::Connection::open(dir.path().join("ledger.db")).unwrap();
        let version: i64 = conn.query_row("PRAGMA user_version", [], |row| row.get(0)).unwrap();
        assert_eq!(version, i64::try_from(MIGRATIONS.len()).unwrap());
    }
}
