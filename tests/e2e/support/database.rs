//! A fresh database per service per test: SQLite files in a temporary directory, or new
//! PostgreSQL databases (`SLUICE_TEST_POSTGRES`, default `postgres://postgres@127.0.0.1:5432`),
//! dropped afterwards.

use sqlx::{Connection, Executor};

/// Which database the services of a test use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

fn postgres_base() -> String {
    std::env::var("SLUICE_TEST_POSTGRES").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

/// The databases of one test.
#[derive(Debug)]
pub struct Databases {
    backend: Backend,
    id: String,
    dir: std::path::PathBuf,
    created: Vec<String>,
}

impl Databases {
    pub fn new(backend: Backend) -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let dir = std::env::temp_dir().join(format!("sluice-test-{id}"));
        Self { backend, id, dir, created: Vec::new() }
    }

    /// A file path in this test's temporary directory (removed with it).
    pub fn file(&self, name: &str) -> std::path::PathBuf {
        std::fs::create_dir_all(&self.dir).expect("creating the test directory");
        self.dir.join(name)
    }

    /// A database URL for `service`, creating the database.
    pub async fn url_for(&mut self, service: &str) -> String {
        sqlx::any::install_default_drivers();
        match self.backend {
            Backend::Sqlite => {
                std::fs::create_dir_all(&self.dir).expect("creating the test directory");
                format!("sqlite://{}?mode=rwc", self.dir.join(format!("{service}.db")).display())
            }
            Backend::Postgres => {
                let name = format!("sluice_test_{}_{service}", self.id);
                let mut admin = sqlx::AnyConnection::connect(&format!("{}/postgres", postgres_base()))
                    .await
                    .expect("PostgreSQL unreachable (SLUICE_TEST_POSTGRES)");
                admin.execute(format!("CREATE DATABASE \"{name}\"").as_str()).await.expect("creating a test database");
                self.created.push(name.clone());
                format!("{}/{name}", postgres_base())
            }
        }
    }
}

impl Drop for Databases {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        let names = std::mem::take(&mut self.created);
        if names.is_empty() {
            return;
        }
        // Drop runs in async tests: do the async cleanup on a thread of its own.
        let _ = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
            runtime.block_on(async move {
                if let Ok(mut admin) = sqlx::AnyConnection::connect(&format!("{}/postgres", postgres_base())).await {
                    for name in names {
                        let _ = admin.execute(format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)").as_str()).await;
                    }
                }
            });
        })
        .join();
    }
}
