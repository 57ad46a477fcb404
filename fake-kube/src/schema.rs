//! Structural-schema checks of custom resources against their CRD's `openAPIV3Schema`.
//!
//! What the API server does for a CRD-served object, to the extent tests need it: unknown
//! fields are pruned (unless `x-kubernetes-preserve-unknown-fields`), `null` in a
//! non-nullable field is dropped, and then types, `required`, `enum`, `minItems`/`maxItems`,
//! `maxLength` and `minimum`/`maximum` are checked. Of CEL (`x-kubernetes-validations`) only
//! the transition rules CRDs use for immutability are evaluated on updates: `self == oldSelf`
//! and `has(self.f) == has(oldSelf.f)`; other rules are ignored. `metadata` is left to the
//! store's own checks. Defaults are applied for missing properties that declare one.

use serde_json::{Map, Value};

use crate::store::Cause;

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// Prunes, defaults and checks `obj` (a whole object) against `schema`; returns the causes.
pub(crate) fn check(schema: &Value, obj: &mut Value) -> Vec<Cause> {
    let mut causes = Vec::new();
    let Some(map) = obj.as_object_mut() else {
        return causes;
    };
    let props = schema.get("properties").and_then(Value::as_object);
    let preserve = schema
        .get("x-kubernetes-preserve-unknown-fields")
        .and_then(Value::as_bool)
        == Some(true);
    let keys: Vec<String> = map.keys().cloned().collect();
    for key in keys {
        if matches!(key.as_str(), "apiVersion" | "kind" | "metadata") {
            continue;
        }
        match props.and_then(|p| p.get(&key)) {
            Some(sub) => {
                if let Some(v) = map.get_mut(&key) {
                    node(sub, v, &key, &mut causes);
                }
                if map.get(&key).is_some_and(Value::is_null) {
                    map.remove(&key);
                }
            }
            None if preserve => {}
            None => {
                map.remove(&key);
            }
        }
    }
    required(schema, map, "", &mut causes);
    causes
}

fn required(schema: &Value, map: &mut Map<String, Value>, path: &str, causes: &mut Vec<Cause>) {
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        for (k, sub) in props {
            if !map.contains_key(k)
                && let Some(d) = sub.get("default")
            {
                map.insert(k.clone(), d.clone());
            }
        }
    }
    for r in schema
        .get("required")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
    {
        if map.get(r).is_none_or(Value::is_null) {
            causes.push(Cause {
                reason: "FieldValueRequired",
                field: join(path, r),
                message: "Required value".into(),
            });
        }
    }
}

fn node(schema: &Value, v: &mut Value, path: &str, causes: &mut Vec<Cause>) {
    if v.is_null() {
        return;
    }
    if schema
        .get("x-kubernetes-int-or-string")
        .and_then(Value::as_bool)
        == Some(true)
    {
        if !(v.is_string() || v.is_i64() || v.is_u64()) {
            causes.push(invalid(path, v, "must be an integer or a string"));
        }
        return;
    }
    let want = schema.get("type").and_then(Value::as_str).unwrap_or("");
    let have = type_name(v);
    let ok = match want {
        "" => true,
        "number" => matches!(have, "number" | "integer"),
        w => w == have,
    };
    if !ok {
        causes.push(Cause {
            reason: "FieldValueTypeInvalid",
            field: path.to_string(),
            message: format!(
                "Invalid value: \"{have}\": {path} in body must be of type {want}: \"{have}\""
            ),
        });
        return;
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(v)
    {
        let list: Vec<String> = allowed.iter().map(Value::to_string).collect();
        causes.push(Cause {
            reason: "FieldValueNotSupported",
            field: path.to_string(),
            message: format!(
                "Unsupported value: {v}: supported values: {}",
                list.join(", ")
            ),
        });
    }
    match v {
        Value::Object(map) => {
            let preserve = schema
                .get("x-kubernetes-preserve-unknown-fields")
                .and_then(Value::as_bool)
                == Some(true);
            let props = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties").filter(|a| a.is_object());
            let keys: Vec<String> = map.keys().cloned().collect();
            for key in keys {
                let sub = props.and_then(|p| p.get(&key)).or(additional);
                match sub {
                    Some(sub) => {
                        if let Some(child) = map.get_mut(&key) {
                            node(sub, child, &join(path, &key), causes);
                        }
                        let nullable = sub.get("nullable").and_then(Value::as_bool) == Some(true);
                        if !nullable && map.get(&key).is_some_and(Value::is_null) {
                            map.remove(&key);
                        }
                    }
                    None if preserve
                        || schema.get("additionalProperties") == Some(&Value::Bool(true)) => {}
                    None => {
                        map.remove(&key);
                    }
                }
            }
            required(schema, map, path, causes);
        }
        Value::Array(items) => {
            let n = items.len() as u64;
            if let Some(max) = schema.get("maxItems").and_then(Value::as_u64)
                && n > max
            {
                causes.push(Cause {
                    reason: "FieldValueTooMany",
                    field: path.to_string(),
                    message: format!("Too many: {n}: must have at most {max} items"),
                });
            }
            if let Some(min) = schema.get("minItems").and_then(Value::as_u64)
                && n < min
            {
                causes.push(invalid(
                    path,
                    v,
                    &format!("should have at least {min} items"),
                ));
                return;
            }
            if let Some(sub) = schema.get("items") {
                for (i, item) in items.iter_mut().enumerate() {
                    node(sub, item, &format!("{path}[{i}]"), causes);
                }
            }
        }
        Value::String(s) => {
            if let Some(max) = schema.get("maxLength").and_then(Value::as_u64)
                && s.chars().count() as u64 > max
            {
                causes.push(Cause {
                    reason: "FieldValueTooLong",
                    field: path.to_string(),
                    message: format!("Too long: may not be longer than {max}"),
                });
            }
        }
        Value::Number(n) => {
            let x = n.as_f64().unwrap_or(0.0);
            if let Some(min) = schema.get("minimum").and_then(Value::as_f64)
                && x < min
            {
                causes.push(invalid(
                    path,
                    v,
                    &format!("should be greater than or equal to {min}"),
                ));
            }
            if let Some(max) = schema.get("maximum").and_then(Value::as_f64)
                && x > max
            {
                causes.push(invalid(
                    path,
                    v,
                    &format!("should be less than or equal to {max}"),
                ));
            }
        }
        _ => {}
    }
}

fn invalid(path: &str, v: &Value, why: &str) -> Cause {
    Cause {
        reason: "FieldValueInvalid",
        field: path.to_string(),
        message: format!("Invalid value: {v}: {why}"),
    }
}

/// Evaluates the immutability transition rules of `schema` between two versions of an object.
pub(crate) fn transitions(schema: &Value, old: &Value, new: &Value) -> Vec<Cause> {
    let mut causes = Vec::new();
    walk_rules(schema, Some(old), Some(new), "", &mut causes);
    causes
}

fn walk_rules(
    schema: &Value,
    old: Option<&Value>,
    new: Option<&Value>,
    path: &str,
    causes: &mut Vec<Cause>,
) {
    let (Some(old), Some(new)) = (old, new) else {
        // Transition rules only run when both sides have the field.
        return;
    };
    for rule in schema
        .get("x-kubernetes-validations")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let text = rule.get("rule").and_then(Value::as_str).unwrap_or("");
        let message = rule
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or("failed rule")
            .to_string();
        let broken = if text.trim() == "self == oldSelf" {
            old != new
        } else if let Some(field) = has_rule(text) {
            old.get(field).is_some() != new.get(field).is_some()
        } else {
            false
        };
        if broken {
            causes.push(Cause {
                reason: "FieldValueInvalid",
                field: path.to_string(),
                message: format!("Invalid value: \"object\": {message}"),
            });
        }
    }
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        for (k, sub) in props {
            if path.is_empty() && k == "metadata" {
                continue;
            }
            walk_rules(sub, old.get(k), new.get(k), &join(path, k), causes);
        }
    }
}

/// `has(self.f) == has(oldSelf.f)` -> `f`.
fn has_rule(text: &str) -> Option<&str> {
    let (a, b) = text.split_once("==")?;
    let f = a.trim().strip_prefix("has(self.")?.strip_suffix(')')?;
    let g = b.trim().strip_prefix("has(oldSelf.")?.strip_suffix(')')?;
    (f == g).then_some(f)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Value {
        json!({"type": "object", "properties": {
            "spec": {"type": "object", "required": ["state", "items"], "properties": {
                "state": {"type": "string", "enum": ["a", "b"]},
                "auto": {"type": "boolean", "default": false},
                "items": {"type": "array", "minItems": 1, "maxItems": 1, "items": {"type": "string"}},
                "fixed": {"type": "string", "x-kubernetes-validations": [{"rule": "self == oldSelf", "message": "fixed is immutable"}]}
            }}
        }})
    }

    #[test]
    fn prunes_defaults_and_checks_types_enums_and_bounds() {
        let mut obj = json!({"apiVersion": "x/v1", "kind": "X", "metadata": {"name": "a"},
            "spec": {"state": "a", "items": ["x"], "junk": 1}, "extra": true});
        assert!(check(&schema(), &mut obj).is_empty());
        assert_eq!(
            obj["spec"],
            json!({"state": "a", "items": ["x"], "auto": false})
        );
        assert!(obj.get("extra").is_none());

        let mut bad = json!({"spec": {"state": "c", "items": [], "auto": "yes"}});
        let mut fields: Vec<String> = check(&schema(), &mut bad)
            .into_iter()
            .map(|c| c.field)
            .collect();
        fields.sort();
        assert_eq!(fields, ["spec.auto", "spec.items", "spec.state"]);
        let mut missing = json!({"spec": {"items": ["a", "b"]}});
        let reasons: Vec<&str> = check(&schema(), &mut missing)
            .into_iter()
            .map(|c| c.reason)
            .collect();
        assert_eq!(reasons, ["FieldValueTooMany", "FieldValueRequired"]);
    }

    #[test]
    fn preserve_unknown_fields_keeps_everything() {
        let schema = json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true});
        let mut obj = json!({"spec": {"a": 1}, "status": {"b": "c"}});
        assert!(check(&schema, &mut obj).is_empty());
        assert_eq!(obj, json!({"spec": {"a": 1}, "status": {"b": "c"}}));
    }

    #[test]
    fn immutability_rules_compare_old_and_new() {
        let old = json!({"spec": {"fixed": "a"}});
        assert!(transitions(&schema(), &old, &old).is_empty());
        let new = json!({"spec": {"fixed": "b"}});
        let causes = transitions(&schema(), &old, &new);
        assert_eq!(causes.len(), 1);
        assert_eq!(causes[0].field, "spec.fixed");
        assert!(causes[0].message.contains("fixed is immutable"));
        assert_eq!(
            has_rule("has(self.parameters) == has(oldSelf.parameters)"),
            Some("parameters")
        );
    }
}
