//! Parsing of OpenAI request bodies: sampling fields, messages and content parts, modalities.

use super::*;

fn chat(json: &str) -> ChatCompletionRequest {
    serde_json::from_str(json).unwrap()
}

#[test]
fn parses_string_and_part_contents() {
    let r = chat(
        r#"{"model":"m","messages":[{"role":"system","content":"be brief"},{"role":"user","content":[{"type":"text","text":"hi "},{"type":"text","text":"there"}]}]}"#,
    );
    let input = r.chat_messages().unwrap();
    let m = &input.messages;
    assert_eq!(
        m[1].content,
        omnistage_stages::MessageContent::Text("hi there".into())
    );
    assert!(input.media.is_empty());
    assert_eq!(r.output_modalities().unwrap(), vec![Modality::Text]);
}

#[test]
fn rejects_out_of_range_sampling() {
    let bad = [
        (r#""temperature":3"#, "temperature"),
        (r#""top_p":0"#, "top_p"),
        (r#""max_tokens":0"#, "max_tokens"),
        (r#""n":2"#, "n"),
        (r#""top_k":-5"#, "top_k"),
        (r#""presence_penalty":0.5"#, "presence_penalty"),
    ];
    for (field, param) in bad {
        let r = chat(&format!(
            r#"{{"messages":[{{"role":"user","content":"x"}}],{field}}}"#
        ));
        let err = r.sampling.to_params().unwrap_err();
        assert_eq!(err.param.as_deref(), Some(param), "{field}");
    }
}

#[test]
fn stop_accepts_string_or_list() {
    let r = chat(r#"{"messages":[{"role":"user","content":"x"}],"stop":"END","temperature":0}"#);
    assert_eq!(
        r.sampling.to_params().unwrap().stop,
        vec!["END".to_string()]
    );
    let r = chat(r#"{"messages":[{"role":"user","content":"x"}],"stop":["a","b"]}"#);
    assert_eq!(r.sampling.to_params().unwrap().stop.len(), 2);
}

#[test]
fn rejects_unknown_roles_parts_and_modalities() {
    assert!(chat(r#"{"messages":[{"role":"wizard","content":"x"}]}"#)
        .chat_messages()
        .is_err());
    assert!(
        chat(r#"{"messages":[{"role":"user","content":[{"type":"image_url"}]}]}"#)
            .chat_messages()
            .is_err()
    );
    assert!(
        chat(r#"{"messages":[{"role":"user","content":"x"}],"modalities":["smell"]}"#)
            .output_modalities()
            .is_err()
    );
    assert!(chat(r#"{"messages":[]}"#).chat_messages().is_err());
}

#[test]
fn media_parts_keep_their_places() {
    let r = chat(
        r#"{"messages":[
            {"role":"system","content":"be brief"},
            {"role":"user","content":[
                {"type":"text","text":"what is "},
                {"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA","detail":"low"}},
                {"type":"text","text":" and "},
                {"type":"input_audio","input_audio":{"data":"UklGRg==","format":"wav"}}]},
            {"role":"user","content":[{"type":"image_url","image_url":"https://example.com/a.jpg"}]}]}"#,
    );
    let input = r.chat_messages().unwrap();
    assert_eq!(
        input.messages[0].content,
        StageContent::Text("be brief".into())
    );
    assert_eq!(
        input.messages[1].content,
        StageContent::Parts(vec![
            StagePart::Text {
                text: "what is ".into()
            },
            StagePart::Image,
            StagePart::Text {
                text: " and ".into()
            },
            StagePart::Audio,
        ])
    );
    assert_eq!(
        input.messages[2].content,
        StageContent::Parts(vec![StagePart::Image])
    );
    let ats: Vec<&str> = input.media.iter().map(|p| p.at.as_str()).collect();
    assert_eq!(
        ats,
        [
            "messages[1].content[1]",
            "messages[1].content[3]",
            "messages[2].content[0]"
        ]
    );
    assert_eq!(
        input.media[1].source,
        MediaSource::Audio {
            data: "UklGRg==".into(),
            format: AudioFormat::Wav
        }
    );
    assert_eq!(
        input.media[2].source,
        MediaSource::ImageUrl("https://example.com/a.jpg".into())
    );
}

#[test]
fn malformed_media_parts_name_the_field() {
    let cases = [
        (
            r#"{"type":"image_url"}"#,
            "messages[0].content[1].image_url.url",
        ),
        (
            r#"{"type":"image_url","image_url":{}}"#,
            "messages[0].content[1].image_url.url",
        ),
        (
            r#"{"type":"image_url","image_url":{"url":""}}"#,
            "messages[0].content[1].image_url.url",
        ),
        (
            r#"{"type":"image_url","image_url":7}"#,
            "messages[0].content[1].image_url",
        ),
        (
            r#"{"type":"image_url","image_url":{"url":"data:,","detail":"max"}}"#,
            "messages[0].content[1].image_url.detail",
        ),
        (
            r#"{"type":"input_audio"}"#,
            "messages[0].content[1].input_audio",
        ),
        (
            r#"{"type":"input_audio","input_audio":{"data":"AAAA"}}"#,
            "messages[0].content[1].input_audio.format",
        ),
        (
            r#"{"type":"input_audio","input_audio":{"data":"AAAA","format":"flac"}}"#,
            "messages[0].content[1].input_audio.format",
        ),
        (
            r#"{"type":"input_audio","input_audio":{"format":"mp3"}}"#,
            "messages[0].content[1].input_audio.data",
        ),
        (
            r#"{"type":"video_url","video_url":{}}"#,
            "messages[0].content[1].type",
        ),
        (
            r#"{"image_url":{"url":"x"}}"#,
            "messages[0].content[1].type",
        ),
        (r#"{"type":"text","text":5}"#, "messages[0].content[1].text"),
    ];
    for (part, param) in cases {
        let r = chat(&format!(
            r#"{{"messages":[{{"role":"user","content":[{{"type":"text","text":"hi"}},{part}]}}]}}"#
        ));
        let e = r.chat_messages().unwrap_err();
        assert_eq!(e.param.as_deref(), Some(param), "{part}: {}", e.message);
    }
    let r = chat(
        r#"{"messages":[{"role":"user","content":[{"type":"input_audio","input_audio":{"data":"AA","format":"ogg"}}]}]}"#,
    );
    assert_eq!(
        r.chat_messages().unwrap_err().message,
        "unsupported audio format `ogg`; use wav or mp3"
    );
}
