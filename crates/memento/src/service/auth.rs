//! Authentication and tenancy: who a bearer token is, and which tenant (or
//! tenants) a request by that caller may act in.
//!
//! A tenant's token acts in that tenant only; naming another tenant is
//! answered exactly as naming one that does not exist, so a token cannot
//! learn which other tenants there are. The admin token sees every tenant
//! and acts in one when it names it.

use super::{Service, ServiceError};

/// Who is calling: the admin, or one tenant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// The admin token: every tenant.
    Admin,
    /// A tenant's token: that tenant only.
    Tenant(String),
}

/// Which tenants a listing covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Every tenant (the admin without `?tenant=`).
    All,
    /// One tenant.
    Tenant(String),
}

impl Caller {
    /// The one tenant an operation by this caller acts in; `tenant` is the
    /// one the request names (`?tenant=`), `exists` says whether a tenant
    /// of that name exists.
    ///
    /// # Errors
    /// [`ServiceError::BadRequest`] (`tenant_required`) when the admin
    /// names no tenant; [`ServiceError::NotFound`] for a tenant that does
    /// not exist or is not the caller's (as if it did not exist).
    pub fn act_in(
        &self,
        tenant: Option<&str>,
        exists: impl Fn(&str) -> bool,
    ) -> Result<String, ServiceError> {
        let name = match (self, tenant) {
            (Caller::Tenant(own), None) => return Ok(own.clone()),
            (Caller::Tenant(own), Some(t)) if t == own => return Ok(own.clone()),
            (Caller::Tenant(_), Some(t)) => t,
            (Caller::Admin, Some(t)) if exists(t) => return Ok(t.to_string()),
            (Caller::Admin, Some(t)) => t,
            (Caller::Admin, None) => {
                return Err(ServiceError::bad(
                    "tenant_required",
                    "the admin token acts on a tenant's jobs and snapshots with ?tenant=NAME",
                ));
            }
        };
        Err(ServiceError::NotFound(format!("no tenant {name:?}")))
    }

    /// What a listing by this caller covers; `tenant` and `exists` as for
    /// [`Caller::act_in`].
    ///
    /// # Errors
    /// [`ServiceError::NotFound`] for a tenant that does not exist or is not
    /// the caller's.
    pub fn scope(&self, tenant: Option<&str>, exists: impl Fn(&str) -> bool) -> Result<Scope, ServiceError> {
        match (self, tenant) {
            (Caller::Admin, None) => Ok(Scope::All),
            _ => self.act_in(tenant, exists).map(Scope::Tenant),
        }
    }
}

/// Whether `token` (in clear) is the one whose blake3 is `hash`, in time
/// independent of where they differ (`blake3::Hash` compares in constant
/// time).
pub fn token_matches(token: &str, hash: &blake3::Hash) -> bool {
    blake3::hash(token.as_bytes()) == *hash
}

impl Service {
    /// Who holds `token` (the bearer token in clear).
    ///
    /// # Errors
    /// [`ServiceError::Unauthorized`] for no token or an unknown one.
    pub fn authenticate(&self, token: Option<&str>) -> Result<Caller, ServiceError> {
        let token = token.ok_or(ServiceError::Unauthorized)?;
        if self
            .inner
            .config
            .admin_token
            .is_some_and(|h| token_matches(token, &h))
        {
            return Ok(Caller::Admin);
        }
        // Every tenant is compared, so how long this takes does not say
        // which tenant (if any) matched.
        let mut found = None;
        for t in self.inner.tenants.values() {
            if token_matches(token, &t.config.token) {
                found = Some(Caller::Tenant(t.config.name.clone()));
            }
        }
        found.ok_or(ServiceError::Unauthorized)
    }

    /// What a listing by `caller` covers; `tenant` is the `?tenant=` the
    /// caller asked for.
    ///
    /// # Errors
    /// [`ServiceError::NotFound`] for a tenant that does not exist or is not
    /// the caller's.
    pub fn scope(&self, caller: &Caller, tenant: Option<&str>) -> Result<Scope, ServiceError> {
        caller.scope(tenant, |t| self.inner.tenants.contains_key(t))
    }

    /// The one tenant an operation by `caller` acts in.
    ///
    /// # Errors
    /// As [`Caller::act_in`].
    pub fn tenant_of(&self, caller: &Caller, tenant: Option<&str>) -> Result<String, ServiceError> {
        caller.act_in(tenant, |t| self.inner.tenants.contains_key(t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenants_act_in_their_own_tenant_only_and_the_admin_names_one() {
        let exists = |t: &str| t == "a" || t == "b";
        let a = Caller::Tenant("a".into());
        assert_eq!(a.act_in(None, exists).unwrap(), "a");
        assert_eq!(a.act_in(Some("a"), exists).unwrap(), "a");
        // Another tenant, existing or not: the same "not found".
        for other in ["b", "nobody"] {
            let e = a.act_in(Some(other), exists).unwrap_err();
            assert!(
                matches!(&e, ServiceError::NotFound(m) if m == &format!("no tenant {other:?}")),
                "{e}"
            );
        }
        assert_eq!(Caller::Admin.act_in(Some("b"), exists).unwrap(), "b");
        assert!(matches!(
            Caller::Admin.act_in(Some("nobody"), exists),
            Err(ServiceError::NotFound(_))
        ));
        assert!(matches!(
            Caller::Admin.act_in(None, exists),
            Err(ServiceError::BadRequest {
                code: "tenant_required",
                ..
            })
        ));
        assert_eq!(Caller::Admin.scope(None, exists).unwrap(), Scope::All);
        assert_eq!(a.scope(None, exists).unwrap(), Scope::Tenant("a".into()));
        assert!(a.scope(Some("b"), exists).is_err());
    }

    #[test]
    fn tokens_match_their_hash_only() {
        let h = blake3::hash(b"s3cret");
        assert!(token_matches("s3cret", &h));
        for wrong in ["", "s3cre", "s3cret ", "S3CRET"] {
            assert!(!token_matches(wrong, &h), "{wrong:?}");
        }
    }
}
