//! The small English corpus the tiny tokenizer's BPE merges are learned from.
//!
//! Plain prose written for this project; a few accented words and punctuation marks give the
//! vocabulary some multi-byte tokens. Changing this text changes every tiny `tokenizer.json`.

/// Training text for the tiny byte-level BPE.
pub(crate) const CORPUS: &str = "\
The morning train left the station at seven, and the city slowly woke up around it. \
People walked to work with coffee in their hands, talking about the weather, the news, \
and the small things that fill an ordinary day. A child pointed at a red balloon that \
drifted over the river, and her father smiled and told her a story about where it might go.

In the old library, the shelves were full of books about history, science, music and art. \
Students came in the afternoon to read, to write their notes, and to ask the librarian \
questions. She knew where every book was kept, and she liked to say that a good question \
is worth more than a quick answer. When the sun went down, the reading room was quiet, \
and only the sound of pages turning could be heard.

A model that writes text does not think the way a person does. It reads a sequence of \
tokens, one after another, and it predicts the next one. Each token is a small piece of a \
word: a few letters, a space, or a mark of punctuation. The model learns which pieces \
often follow each other, and with enough examples it can write sentences that are clear \
and useful. Serving such a model means running it for many people at the same time, \
keeping the work on the device busy, and returning the first words as soon as they are ready.

The weather changed in the evening. Clouds came from the west, the wind turned cold, and \
the first drops of rain fell on the streets. The baker closed his shop early and carried \
the last loaves of bread home. At the café on the corner, a waiter stacked the chairs \
and wiped the tables, while two friends finished their tea and talked about their plans \
for the summer: a trip to the mountains, a week by the sea, and a visit to an old friend \
who lived in a small village near the coast.

Numbers are tokens too: 1, 2, 3, 10, 42, 100, 2024 and 3.14 appear in text all the time. \
So do questions? Yes! And lists; commas, colons: quotes \"like this\" and 'like that', \
parentheses (such as these), brackets [and braces {as well}], and symbols like +, -, *, /, \
=, <, >, %, #, @ and &. Code has its own style: fn main() { println!(\"hello, world\"); } \
and def add(a, b): return a + b.

Good software is built in small steps. First make it work, then make it right, then make \
it fast. Write tests that describe what the program should do, and run them often. When \
something breaks, read the error message carefully; it usually says what went wrong and \
where. Keep functions short, give things clear names, and leave the code a little better \
than you found it. A naïve design is not always a bad one, and a simple résumé of the \
problem is often the best place to start.

The garden behind the house had roses, tomatoes, beans and a tall sunflower that leaned \
toward the light. Every morning the old man watered the plants, pulled a few weeds, and \
listened to the birds. He said that patience was the most important thing a gardener \
could learn, because nothing grows faster when you look at it, and everything grows \
when you give it time, water and care.
";
