//! `GET /metrics`: the jobs and tenants of a scope in the Prometheus text
//! format (0.0.4), encoded by `prometheus-client` from a registry built for
//! each scrape.
//!
//! Durations are in seconds and sizes in bytes. A value that cannot be
//! known is left out rather than written as 0: quantiles of a job with no
//! completed snapshot yet, the storage of a tenant whose store could not
//! be read (logged), the quota of a tenant without one.
//!
//! Quantiles are of the completed snapshots in a job's recent history (the
//! same figures as the `summary` of `GET /v1/jobs/{job}/checkpoints`),
//! one series per quantile with a `quantile` label, 0 being the minimum
//! and 1 the maximum. `prometheus-client` has no summary type, so their
//! `# TYPE` is `gauge`; counts are the `memento_snapshots_*_total`
//! counters.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::views::{CheckpointsView, JobView, Stats};
use memento::service::{Scope, Service};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabels {
    tenant: String,
    job: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QuantileLabels {
    tenant: String,
    job: String,
    quantile: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TenantLabels {
    tenant: String,
}

/// Whole numbers (counts, bytes) print as integers.
type Gauges<L> = Family<L, Gauge<u64, std::sync::atomic::AtomicU64>>;
type Seconds<L> = Family<L, Gauge<f64, std::sync::atomic::AtomicU64>>;
type Counters<L> = Family<L, Counter>;

/// Register `metric` as `name` in `registry` and hand it back to fill.
fn add<M: prometheus_client::registry::Metric + Clone + Default>(
    registry: &mut Registry,
    name: &str,
    help: &str,
) -> M {
    let m = M::default();
    registry.register(name, help, m.clone());
    m
}

/// The Prometheus text of the jobs and tenants in `scope`. Blocks on the
/// tenants' stores.
pub(crate) fn render(service: &Service, scope: &Scope) -> Result<String, std::fmt::Error> {
    let mut r = Registry::default();
    let running: Gauges<JobLabels> = add(
        &mut r,
        "memento_job_running",
        "1 while the job runs (or restarts), 0 once it ended.",
    );
    // Counters get `_total` appended by the encoder.
    let records: Counters<JobLabels> = add(
        &mut r,
        "memento_job_records_in",
        "Records read by the job's source.",
    );
    let restarts: Counters<JobLabels> = add(&mut r, "memento_job_restarts", "Restarts after task failures.");
    let completed: Counters<JobLabels> = add(
        &mut r,
        "memento_snapshots_completed",
        "Completed checkpoints and savepoints.",
    );
    let failed: Counters<JobLabels> = add(
        &mut r,
        "memento_snapshots_failed",
        "Failed checkpoints and savepoints.",
    );
    let in_progress: Gauges<JobLabels> = add(&mut r, "memento_snapshots_in_progress", "Snapshots in flight.");
    let restores: Counters<JobLabels> = add(&mut r, "memento_restores", "Restores from a snapshot.");
    let duration: Seconds<QuantileLabels> = add(
        &mut r,
        "memento_snapshot_duration_seconds",
        "Trigger-to-commit time of recent completed snapshots, by quantile (0: min, 1: max).",
    );
    let logical: Gauges<QuantileLabels> = add(
        &mut r,
        "memento_snapshot_logical_bytes",
        "Logical state size of recent completed snapshots, by quantile (0: min, 1: max).",
    );
    let new_bytes: Gauges<QuantileLabels> = add(
        &mut r,
        "memento_snapshot_new_bytes",
        "Bytes newly written by recent completed snapshots, by quantile (0: min, 1: max).",
    );
    let tenant_running: Gauges<TenantLabels> = add(
        &mut r,
        "memento_tenant_jobs_running",
        "Running jobs of the tenant.",
    );
    let storage: Gauges<TenantLabels> = add(
        &mut r,
        "memento_tenant_storage_bytes",
        "Bytes of snapshot blobs the tenant keeps (what its quota limits); absent when the store cannot be read.",
    );
    let quota: Gauges<TenantLabels> = add(
        &mut r,
        "memento_tenant_quota_bytes",
        "The tenant's storage quota (absent: unlimited).",
    );

    let jobs = service.jobs(scope);
    for j in &jobs {
        let view = JobView::of(j);
        let cps = CheckpointsView::of(&j.status());
        let l = JobLabels {
            tenant: view.tenant.clone(),
            job: view.name.clone(),
        };
        running.get_or_create(&l).set(u64::from(view.state.is_live()));
        records.get_or_create(&l).inc_by(view.records_in);
        restarts.get_or_create(&l).inc_by(u64::from(view.restarts));
        completed.get_or_create(&l).inc_by(cps.counts.completed);
        failed.get_or_create(&l).inc_by(cps.counts.failed);
        in_progress.get_or_create(&l).set(cps.counts.in_progress);
        restores.get_or_create(&l).inc_by(cps.counts.restored);
        if cps.summary.completed == 0 {
            continue;
        }
        let labels = |q: &str| QuantileLabels {
            tenant: l.tenant.clone(),
            job: l.job.clone(),
            quantile: q.to_string(),
        };
        for (q, ms) in cps.summary.duration_ms.quantiles() {
            duration.get_or_create(&labels(q)).set(ms as f64 / 1e3);
        }
        let sizes = |family: &Gauges<QuantileLabels>, stats: &Stats| {
            for (q, v) in stats.quantiles() {
                family.get_or_create(&labels(q)).set(v);
            }
        };
        sizes(&logical, &cps.summary.logical_bytes);
        sizes(&new_bytes, &cps.summary.new_bytes);
    }
    for t in service.tenants(scope) {
        let l = TenantLabels {
            tenant: t.name.clone(),
        };
        let live = jobs
            .iter()
            .filter(|j| j.tenant() == t.name && !j.has_ended())
            .count();
        tenant_running.get_or_create(&l).set(live as u64);
        match service.usage_bytes(&t.name) {
            Ok(bytes) => {
                storage.get_or_create(&l).set(bytes);
            }
            Err(e) => tracing::warn!(tenant = %t.name, "metrics: storage of the tenant unknown: {e}"),
        }
        if let Some(q) = t.quota {
            quota.get_or_create(&l).set(q);
        }
    }
    let mut out = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut out, &r)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use memento::spec::host_config::{HostConfig, hash_token};

    #[test]
    fn tenants_are_scoped_and_unknown_values_are_absent() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("host.toml");
        std::fs::write(
            &config,
            format!(
                "state_dir = \"state\"\n[[tenants]]\nname = \"a\"\ntoken_blake3 = \"{}\"\nquota = \"1KiB\"\n\
                 [[tenants]]\nname = \"b\"\ntoken_blake3 = \"{}\"\n",
                hash_token("ta"),
                hash_token("tb")
            ),
        )
        .unwrap();
        let service = Service::start(HostConfig::from_file(&config).unwrap()).unwrap();
        let all = render(&service, &Scope::All).unwrap();
        for line in [
            "memento_tenant_jobs_running{tenant=\"a\"} 0",
            "memento_tenant_storage_bytes{tenant=\"a\"} 0",
            "memento_tenant_storage_bytes{tenant=\"b\"} 0",
            "memento_tenant_quota_bytes{tenant=\"a\"} 1024",
            "# TYPE memento_tenant_quota_bytes gauge",
        ] {
            assert!(all.lines().any(|l| l == line), "{line}:\n{all}");
        }
        // Unlimited: no quota series rather than a made-up number.
        assert!(!all.contains("memento_tenant_quota_bytes{tenant=\"b\"}"), "{all}");
        // No job: no job series at all.
        assert!(!all.contains("job=\""), "{all}");
        let b = render(&service, &Scope::Tenant("b".into())).unwrap();
        assert!(!b.contains("tenant=\"a\""), "{b}");
        assert!(b.contains("memento_tenant_storage_bytes{tenant=\"b\"} 0"), "{b}");
    }
}
