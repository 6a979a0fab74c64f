//! A checker of real response bodies against `openapi.json`: finds the
//! documented route of a request, the response of its status, and checks
//! the JSON body against that schema. It understands the keywords the
//! document uses — `$ref`, `type` (with OpenAPI 3.0's `nullable`),
//! `properties`, `required`, `items`, `enum`, `additionalProperties`, and
//! `allOf` (OpenAPI 3.0's way to make a `$ref` nullable) — and refuses
//! `oneOf`, `anyOf` and `not` rather than let a schema it cannot check
//! pass.

use std::sync::OnceLock;

use serde_json::{Map, Value};

pub struct Doc(Value);

impl Doc {
    /// The document the server serves.
    pub fn get() -> &'static Doc {
        static DOC: OnceLock<Doc> = OnceLock::new();
        DOC.get_or_init(|| {
            Doc(serde_json::from_str(memento_cli::api::multi::OPENAPI).expect("openapi.json is JSON"))
        })
    }

    pub fn value(&self) -> &Value {
        &self.0
    }

    /// The documented path template `path` (without its query) matches:
    /// `{x}` matches one segment; of several, the one with the most literal
    /// segments (`…/checkpoints/config` before `…/checkpoints/{number}`).
    pub fn template(&self, method: &str, path: &str) -> Option<&str> {
        let path = path.split('?').next().unwrap_or(path);
        let segments: Vec<&str> = path.split('/').collect();
        let method = method.to_lowercase();
        self.0["paths"]
            .as_object()?
            .iter()
            .filter(|(_, item)| item.get(&method).is_some())
            .filter_map(|(template, _)| {
                let t: Vec<&str> = template.split('/').collect();
                let fits = t.len() == segments.len()
                    && t.iter().zip(&segments).all(|(t, s)| t.starts_with('{') || t == s);
                fits.then(|| {
                    (
                        t.iter().filter(|s| !s.starts_with('{')).count(),
                        template.as_str(),
                    )
                })
            })
            .max()
            .map(|(_, t)| t)
    }

    /// Check the answer `status` `body` to `method path` against the
    /// document: the route and the status must be documented, and a JSON
    /// body must match its schema. An answer of no documented route (the
    /// router's fallback) must be an `Error`.
    pub fn check_response(&self, method: &str, path: &str, status: u16, body: &str) -> Result<(), String> {
        let Some(template) = self.template(method, path) else {
            if status >= 400 {
                return self.check_json(&serde_json::json!({"$ref": "#/components/schemas/Error"}), body);
            }
            return Err(format!("{method} {path} is no documented route"));
        };
        let op = &self.0["paths"][template][method.to_lowercase()];
        let response = op["responses"]
            .get(status.to_string())
            .ok_or_else(|| format!("{method} {template}: status {status} is not documented"))?;
        let response = self.resolve(response)?;
        let content = response["content"]
            .as_object()
            .ok_or_else(|| format!("{method} {template} {status}: no content documented"))?;
        match content.get("application/json") {
            Some(media) => self.check_json(&media["schema"], body),
            // Text and HTML bodies: documented as strings, nothing to check.
            None => Ok(()),
        }
    }

    fn check_json(&self, schema: &Value, body: &str) -> Result<(), String> {
        let value: Value = serde_json::from_str(body).map_err(|e| format!("not JSON ({e}): {body}"))?;
        self.check(schema, &value, "$")
    }

    fn resolve<'a>(&'a self, schema: &'a Value) -> Result<&'a Value, String> {
        match schema.get("$ref").and_then(Value::as_str) {
            Some(r) => {
                let pointer = r
                    .strip_prefix('#')
                    .ok_or_else(|| format!("only local $refs are supported: {r}"))?;
                let target = self
                    .0
                    .pointer(pointer)
                    .ok_or_else(|| format!("dangling $ref {r}"))?;
                self.resolve(target)
            }
            None => Ok(schema),
        }
    }

    /// Check `value` at `at` (a JSON path for messages) against `schema`.
    pub fn check(&self, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
        let schema = self.resolve(schema)?;
        let s = schema
            .as_object()
            .ok_or_else(|| format!("{at}: schema is not an object: {schema}"))?;
        for k in ["oneOf", "anyOf", "not"] {
            if s.contains_key(k) {
                return Err(format!("{at}: `{k}` is not supported by this checker"));
            }
        }
        if value.is_null() && s.get("nullable") == Some(&Value::Bool(true)) {
            return Ok(());
        }
        if value.is_null() && s.contains_key("type") {
            return Err(format!("{at}: null where the schema is not nullable"));
        }
        for sub in s.get("allOf").and_then(Value::as_array).into_iter().flatten() {
            self.check(sub, value, at)?;
        }
        if let Some(t) = s.get("type").and_then(Value::as_str) {
            let fits = match t {
                "object" => value.is_object(),
                "array" => value.is_array(),
                "string" => value.is_string(),
                "integer" => value.is_u64() || value.is_i64(),
                "number" => value.is_number(),
                "boolean" => value.is_boolean(),
                other => return Err(format!("{at}: unknown type {other:?}")),
            };
            if !fits {
                return Err(format!("{at}: expected {t}, got {value}"));
            }
        }
        if let Some(allowed) = s.get("enum").and_then(Value::as_array)
            && !allowed.contains(value)
        {
            return Err(format!("{at}: {value} is not one of {allowed:?}"));
        }
        if let Some(items) = s.get("items")
            && let Some(list) = value.as_array()
        {
            for (i, v) in list.iter().enumerate() {
                self.check(items, v, &format!("{at}[{i}]"))?;
            }
        }
        if let Some(obj) = value.as_object() {
            self.check_object(s, obj, at)?;
        }
        Ok(())
    }

    fn check_object(&self, s: &Map<String, Value>, obj: &Map<String, Value>, at: &str) -> Result<(), String> {
        let empty = Map::new();
        let properties = s.get("properties").and_then(Value::as_object).unwrap_or(&empty);
        for r in s.get("required").and_then(Value::as_array).into_iter().flatten() {
            let r = r.as_str().unwrap_or_default();
            if !obj.contains_key(r) {
                return Err(format!("{at}: required field `{r}` is missing"));
            }
        }
        for (k, v) in obj {
            let at = format!("{at}.{k}");
            match (properties.get(k), s.get("additionalProperties")) {
                (Some(p), _) => self.check(p, v, &at)?,
                (None, Some(Value::Bool(false))) => return Err(format!("{at}: not in the schema")),
                (None, Some(extra)) if extra.is_object() => self.check(extra, v, &at)?,
                (None, _) => {}
            }
        }
        Ok(())
    }
}
