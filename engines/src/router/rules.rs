//! The rule form: the first rule whose condition holds picks the expert, else the default.

use omnistage_stages::deploy::{RouteRule, RuleCondition};
use omnistage_stages::{JobRequest, Modality, Prompt};

/// What the rules decided for a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleMatch {
    /// The expert stage id.
    pub expert: String,
    /// The matching rule's text (`"input:image -> vision"`), or `"default"`.
    pub reason: String,
}

/// Whether `when` holds for `request`:
///
/// - `input:image` / `input:audio`: the request carries a media item of that modality;
///   `input:text`: the prompt has text (non-empty text in any message, or token ids).
/// - `output:M`: the request asks for output modality `M`.
/// - `model:NAME`: the client's `model` field is exactly `NAME`.
pub fn condition_holds(when: &RuleCondition, request: &JobRequest) -> bool {
    match when {
        RuleCondition::Input(Modality::Text) => match &request.prompt {
            Prompt::Chat(messages) => messages.iter().any(|m| !m.content.text().is_empty()),
            Prompt::Completion(t) | Prompt::Speak(t) => !t.is_empty(),
            Prompt::Tokens(ids) => !ids.is_empty(),
        },
        RuleCondition::Input(m) => request.media.iter().any(|item| item.modality() == *m),
        RuleCondition::Output(m) => request.outputs.contains(m),
        RuleCondition::Model(name) => request.route.model.as_deref() == Some(name.as_str()),
    }
}

/// The first rule of `rules` that holds for `request`, else `default`.
pub fn match_rules(rules: &[RouteRule], default: &str, request: &JobRequest) -> RuleMatch {
    match rules.iter().find(|r| condition_holds(&r.when, request)) {
        Some(rule) => RuleMatch {
            expert: rule.expert.clone(),
            reason: rule.text(),
        },
        None => RuleMatch {
            expert: default.to_string(),
            reason: "default".into(),
        },
    }
}
