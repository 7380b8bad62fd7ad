//! A checkpoint's chat template (Jinja, as Hugging Face `transformers` renders it) turning chat
//! messages into the prompt text.
//!
//! Rendering follows `transformers`' `apply_chat_template`: `trim_blocks` and `lstrip_blocks` on,
//! Python string/dict/list methods (`.strip()`, `.startswith()`, `.split()`, `.items()`, ...)
//! through `minijinja-contrib`'s pycompat, a `raise_exception(msg)` function, the tokenizer's
//! special tokens (`bos_token`, `eos_token`, `pad_token`, `unk_token`) as variables and
//! `tools = none`. `strftime_now` is not provided, so templates that use it when defined (Llama
//! 3.2) fall back to their built-in date and the output stays deterministic.

use minijinja::{Environment, ErrorKind, Value};
use omnistage_stages::ChatMessage;
use serde_json::Value as Json;
use std::path::{Path, PathBuf};

/// Name under which the template is registered in its environment.
const TEMPLATE_NAME: &str = "chat_template";

/// Errors from loading or rendering a chat template.
#[derive(Debug, thiserror::Error)]
pub enum ChatTemplateError {
    /// A file exists but could not be read.
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A JSON file could not be parsed.
    #[error("{}: invalid JSON: {source}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// A JSON file parsed but a field has the wrong shape.
    #[error("{}: {message}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The template text is not valid Jinja (for minijinja).
    #[error("{}: chat template does not compile: {source:#}", path.display())]
    Syntax {
        /// The file the template came from.
        path: PathBuf,
        /// The template error.
        #[source]
        source: minijinja::Error,
    },
    /// Rendering failed, including a `raise_exception(...)` call in the template.
    #[error("{}: chat template failed to render: {source:#}", path.display())]
    Render {
        /// The file the template came from.
        path: PathBuf,
        /// The template error.
        #[source]
        source: minijinja::Error,
    },
}

/// A compiled chat template plus the special tokens it may reference.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    path: PathBuf,
    bos_token: Option<String>,
    eos_token: Option<String>,
    pad_token: Option<String>,
    unk_token: Option<String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("path", &self.path)
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("source_len", &self.source.len())
            .finish()
    }
}

/// The special-token variables a template sees.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    /// `bos_token`.
    pub bos_token: Option<String>,
    /// `eos_token`.
    pub eos_token: Option<String>,
    /// `pad_token`.
    pub pad_token: Option<String>,
    /// `unk_token`.
    pub unk_token: Option<String>,
}

impl ChatTemplate {
    /// Loads the chat template of the checkpoint in `dir`, looking in order at the
    /// `chat_template` field of `tokenizer_config.json` (a string, or a list of
    /// `{name, template}` of which `"default"` is taken), `chat_template.jinja`, and
    /// `chat_template.json` (`{"chat_template": ...}`). Special tokens come from
    /// `tokenizer_config.json` (strings or `{"content": ...}` objects).
    ///
    /// Returns `Ok(None)` when the checkpoint has no chat template.
    pub fn load(dir: &Path) -> Result<Option<Self>, ChatTemplateError> {
        let config_path = dir.join("tokenizer_config.json");
        let config = read_json_if_exists(&config_path)?;
        let specials = config.as_ref().map(special_tokens).unwrap_or_default();

        if let Some(config) = &config {
            if let Some(source) = template_field(config, &config_path)? {
                return Self::new(source, specials, config_path).map(Some);
            }
        }
        let jinja_path = dir.join("chat_template.jinja");
        if jinja_path.is_file() {
            let source =
                std::fs::read_to_string(&jinja_path).map_err(|source| ChatTemplateError::Read {
                    path: jinja_path.clone(),
                    source,
                })?;
            return Self::new(source, specials, jinja_path).map(Some);
        }
        let json_path = dir.join("chat_template.json");
        if let Some(json) = read_json_if_exists(&json_path)? {
            return match template_field(&json, &json_path)? {
                Some(source) => Self::new(source, specials, json_path).map(Some),
                None => Err(ChatTemplateError::Invalid {
                    path: json_path,
                    message: "no \"chat_template\" field".into(),
                }),
            };
        }
        Ok(None)
    }

    /// Compiles template text; `path` is only used in error messages.
    pub fn new(
        source: String,
        specials: SpecialTokens,
        path: PathBuf,
    ) -> Result<Self, ChatTemplateError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned(TEMPLATE_NAME, source.clone())
            .map_err(|source| ChatTemplateError::Syntax {
                path: path.clone(),
                source,
            })?;
        Ok(Self {
            env,
            source,
            path,
            bos_token: specials.bos_token,
            eos_token: specials.eos_token,
            pad_token: specials.pad_token,
            unk_token: specials.unk_token,
        })
    }

    /// The template text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The file the template came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `bos_token` as the template sees it.
    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    /// `eos_token` as the template sees it.
    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// Renders `messages` to prompt text; `add_generation_prompt` appends the assistant turn
    /// header so the model answers next. The result contains special tokens as text (encode it
    /// without adding special tokens again).
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, ChatTemplateError> {
        let render_err = |source| ChatTemplateError::Render {
            path: self.path.clone(),
            source,
        };
        let template = self.env.get_template(TEMPLATE_NAME).map_err(render_err)?;
        let ctx = minijinja::context! {
            messages => Value::from_serialize(messages),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
            pad_token => self.pad_token.clone(),
            unk_token => self.unk_token.clone(),
            tools => Value::from(()),
            documents => Value::from(()),
        };
        template.render(ctx).map_err(render_err)
    }
}

/// `raise_exception(message)`: aborts rendering with the template's message.
fn raise_exception(message: String) -> Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

/// Reads and parses a JSON file; `Ok(None)` when it does not exist.
fn read_json_if_exists(path: &Path) -> Result<Option<Json>, ChatTemplateError> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|source| ChatTemplateError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|source| ChatTemplateError::Json {
            path: path.to_path_buf(),
            source,
        })
}

/// The `chat_template` field: a string, or a list of `{name, template}` (take `"default"`).
/// `None` when absent or null.
fn template_field(json: &Json, path: &Path) -> Result<Option<String>, ChatTemplateError> {
    let invalid = |message: String| ChatTemplateError::Invalid {
        path: path.to_path_buf(),
        message,
    };
    match json.get("chat_template") {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s.clone())),
        Some(Json::Array(items)) => {
            for item in items {
                if item.get("name").and_then(Json::as_str) == Some("default") {
                    return match item.get("template") {
                        Some(Json::String(s)) => Ok(Some(s.clone())),
                        _ => Err(invalid(
                            "chat template \"default\" has no string \"template\"".into(),
                        )),
                    };
                }
            }
            Err(invalid(
                "\"chat_template\" lists named templates but none named \"default\"".into(),
            ))
        }
        Some(other) => Err(invalid(format!(
            "\"chat_template\" must be a string or a list of {{name, template}}, found {}",
            json_kind(other)
        ))),
    }
}

/// Special tokens from a parsed `tokenizer_config.json`.
fn special_tokens(config: &Json) -> SpecialTokens {
    let get = |key: &str| token_content(config.get(key)?);
    SpecialTokens {
        bos_token: get("bos_token"),
        eos_token: get("eos_token"),
        pad_token: get("pad_token"),
        unk_token: get("unk_token"),
    }
}

/// A special token given as a string or as an `AddedToken` object `{"content": ...}`.
fn token_content(value: &Json) -> Option<String> {
    match value {
        Json::String(s) => Some(s.clone()),
        Json::Object(map) => map
            .get("content")
            .and_then(Json::as_str)
            .map(str::to_string),
        _ => None,
    }
}

/// A JSON value's kind, for error messages.
fn json_kind(value: &Json) -> &'static str {
    match value {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "a list",
        Json::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage::text(role, content)
    }

    #[test]
    fn raise_exception_surfaces_message() {
        let t = ChatTemplate::new(
            "{{ raise_exception('only user and assistant roles are supported') }}".into(),
            SpecialTokens::default(),
            PathBuf::from("x.jinja"),
        )
        .unwrap();
        let err = t.render(&[msg("user", "hi")], true).unwrap_err();
        assert!(
            err.to_string()
                .contains("only user and assistant roles are supported"),
            "{err}"
        );
    }

    #[test]
    fn syntax_error_is_typed() {
        let err = ChatTemplate::new(
            "{% if %}".into(),
            SpecialTokens::default(),
            PathBuf::from("t.jinja"),
        )
        .unwrap_err();
        assert!(matches!(err, ChatTemplateError::Syntax { .. }));
        assert!(err.to_string().starts_with("t.jinja:"));
    }

    #[test]
    fn pycompat_methods_work() {
        let t = ChatTemplate::new(
            "{% for m in messages %}{{ m.content.strip().upper() }}|{{ m.content.split(',')[1] }}|{{ m.role.startswith('us') }}{% endfor %}".into(),
            SpecialTokens::default(),
            PathBuf::from("t.jinja"),
        )
        .unwrap();
        assert_eq!(
            t.render(&[msg("user", " a,b ")], false).unwrap(),
            "A,B|b |True"
        );
    }

    #[test]
    fn token_content_accepts_objects() {
        let config = serde_json::json!({"bos_token": {"content": "<s>", "lstrip": false}, "eos_token": "</s>", "pad_token": null});
        let s = special_tokens(&config);
        assert_eq!(s.bos_token.as_deref(), Some("<s>"));
        assert_eq!(s.eos_token.as_deref(), Some("</s>"));
        assert_eq!(s.pad_token, None);
    }
}
