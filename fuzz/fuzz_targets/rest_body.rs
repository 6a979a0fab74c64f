//! The JSON bodies the REST API accepts, through the functions its
//! handlers call: a savepoint trigger's body, and a job submission's body
//! parsed and then submitted to a real service (job file, plugin names and
//! bytes, the tenant's caps, confinement, `from`). Every bad body is a 4xx
//! error, never a panic or a 500.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use memento::service::{Service, ServiceError};
use memento::spec::host_config::HostConfig;
use memento_cli::api::jobs::trigger_body;
use memento_cli::api::multi::submission_body;

/// One service for the whole run: starting one compiles nothing, but
/// opens the store and the engine.
fn service() -> &'static Service {
    static SERVICE: OnceLock<(tempfile::TempDir, Service)> = OnceLock::new();
    &SERVICE
        .get_or_init(|| {
            let dir = tempfile::tempdir().expect("scratch directory");
            let config = HostConfig::from_toml(
                "listen = \"127.0.0.1:0\"\nstate_dir = \"state\"\n\
                 [[tenants]]\nname = \"a\"\ntoken_blake3 = \"0000000000000000000000000000000000000000000000000000000000000000\"\n\
                 max_jobs = 1\nmemory = \"64MiB\"\n",
                std::path::Path::new("<fuzz>"),
                dir.path(),
            )
            .expect("the fuzz host config is valid");
            let service = Service::start(config).expect("service starts");
            (dir, service)
        })
        .1
}

fuzz_target!(|data: &[u8]| {
    let _ = trigger_body(data);
    let Ok(submission) = submission_body(data) else {
        return;
    };
    match service().submit("a", submission) {
        // A job that really starts is not what this target looks for;
        // stop it so the next input finds the tenant's slot free.
        Ok(job) => {
            let _ = job.cancel();
            while !job.has_ended() {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
        Err(ServiceError::Internal(e)) => panic!("a request body made the host fail: {e}"),
        Err(_) => {}
    }
});
