/* sd-webui-lora-core: help while typing LoRA tags in the prompt boxes.
 *
 * Completion: after "<lora:" (or "<lyco:") the LoRA names (aliases, subfolders; the SD-version filter of the
 * cards), after "lbw=" the block-weight presets, after "lbwe=" the elemental presets, after ":" the keys.
 * Up/Down choose, Enter or Tab take, Escape closes; with a modifier (Ctrl+Up/Down: A1111's weight editing,
 * Ctrl+Enter: Generate) the key is left to the WebUI.
 * Live check: a moment after the prompt changes, the tags a generation would skip are listed under the box, with
 * the message it would put in "Lora errors" (POST ./lora-core/v1/check runs the same parser and lookup).
 * Plain script, no build step; the WebUI loads every file of an extension's javascript/ folder.
 */
(function() {
    "use strict";

    const BOXES = [ // [element id, negative]
        ["txt2img_prompt", false], ["txt2img_neg_prompt", true],
        ["img2img_prompt", false], ["img2img_neg_prompt", true],
        ["txt2img_hr_prompt", false], ["txt2img_hr_neg_prompt", true],
    ];
    const CHECK_URL = "./lora-core/v1/check";
    const LISTS_URL = "./lora-core/v1/completions";
    const CHECK_DELAY_MS = 300;
    const LISTS_MAX_AGE_MS = 10000;
    const MAX_SHOWN = 50;
    const TAG_OPEN = /^<(lora|lyco):([^>]*)$/;
    const STOP = /[\s:<>,()[\]]/; // ends the word being completed
    const LABELS = {skipped: "Skipped", warning: "Note", ignored: "Not applied"};

    // ------------------------------------------------------------------ the lists (names, presets, keys)

    let lists = null;
    let listsAt = 0;
    let listsLoading = null;

    /** The completion lists; a list older than a few seconds is shown while a fresh one loads (a new file, another
     * checkpoint and its SD-version filter). */
    function loadLists() {
        if (!listsLoading && Date.now() - listsAt > LISTS_MAX_AGE_MS) {
            listsLoading = fetch(LISTS_URL)
                .then((response) => (response.ok ? response.json() : null))
                .then((data) => {
                    if (data) {
                        lists = data;
                        listsAt = Date.now();
                    }
                    return lists;
                })
                .catch(() => lists)
                .finally(() => {
                    listsLoading = null;
                });
        }
        return lists ? Promise.resolve(lists) : listsLoading;
    }

    // ------------------------------------------------------------------ what is being typed

    /** The completion context at the caret, or null: {kind: "name"|"key"|"lbw"|"lbwe", query, from, to}. */
    function contextAt(text, caret) {
        const before = text.slice(0, caret);
        const open = before.lastIndexOf("<");
        if (open < 0) return null;
        const match = TAG_OPEN.exec(before.slice(open));
        if (!match) return null;
        const body = match[2];
        const bodyStart = open + match[1].length + 2;
        let to = caret;
        while (to < text.length && !STOP.test(text[to]) && text[to] !== "=" && text[to] !== '"') to++;
        if (body.startsWith('"') && body.indexOf('"', 1) < 0) { // a quoted name, still open
            return {kind: "name", query: body.slice(1), from: bodyStart, to: to};
        }
        if (body.indexOf(":") < 0) {
            return {kind: "name", query: body, from: bodyStart, to: to};
        }
        const segmentStart = bodyStart + body.lastIndexOf(":") + 1;
        const segment = text.slice(segmentStart, caret);
        const equals = segment.indexOf("=");
        if (equals < 0) {
            if (/^\s*[\d.+-]/.test(segment)) return null; // a weight
            return {kind: "key", query: segment.trim(), from: segmentStart, to: to};
        }
        const key = segment.slice(0, equals).trim().toLowerCase();
        const value = segment.slice(equals + 1);
        if (/[,:\s]/.test(value)) return null; // a list of weights, or lbwe directives
        if (key === "lbw" || key === "w") return {kind: "lbw", query: value, from: segmentStart + equals + 1, to: to};
        if (key === "lbwe") return {kind: "lbwe", query: value, from: segmentStart + equals + 1, to: to};
        return null;
    }

    /** 0: the name starts with the query, 1: another of its names does, 2: the name contains it, 3: another does. */
    function rank(query, main, others) {
        if (!query) return 0;
        const q = query.toLowerCase();
        const m = main.toLowerCase();
        if (m.startsWith(q)) return 0;
        const rest = others.filter(Boolean).map((other) => other.toLowerCase());
        if (rest.some((other) => other.startsWith(q) || other.includes("/" + q))) return 1;
        if (m.includes(q)) return 2;
        return rest.some((other) => other.includes(q)) ? 3 : -1;
    }

    /** The choices for a context: [{value, insert, detail}], best first. */
    function choicesFor(context, data) {
        let found = [];
        if (context.kind === "name") {
            for (const entry of data.names) {
                const folder = entry.path.replace(/\.[^./]+$/, ""); // "styles/ink": not ".safetensors"
                const score = rank(context.query, entry.name, [entry.alias, entry.file, folder]);
                const detail = entry.path + (entry.version !== "unknown" ? "  " + entry.version.toUpperCase() : "");
                if (score >= 0) found.push({score: score, value: entry.name, insert: entry.insert, detail: detail});
            }
        } else if (context.kind === "key") {
            const q = context.query.toLowerCase();
            for (const entry of data.keys) {
                if (entry.key.startsWith(q)) found.push({score: 0, value: entry.key + "=", insert: entry.key + "=", detail: entry.help});
            }
        } else {
            const names = context.kind === "lbw" ? data.lbw_presets : data.lbwe_presets;
            for (const name of names) {
                const score = rank(context.query, name, []);
                if (score >= 0) found.push({score: score, value: name, insert: name, detail: context.kind + " preset"});
            }
        }
        if (context.kind !== "key") found.sort((a, b) => a.score - b.score || a.value.localeCompare(b.value));
        // the word typed already in full is no help
        if (found.length === 1 && found[0].insert === context.query) return [];
        return found.slice(0, MAX_SHOWN);
    }

    // ------------------------------------------------------------------ the list under the caret

    const popup = {element: null, textarea: null, context: null, choices: [], selected: 0};

    function popupElement() {
        if (!popup.element) {
            const element = document.createElement("div");
            element.id = "lora_core_complete";
            element.className = "lora-core-complete";
            element.setAttribute("role", "listbox");
            element.style.display = "none";
            element.addEventListener("mousedown", (event) => event.preventDefault()); // the box keeps the focus
            element.addEventListener("click", (event) => {
                const option = event.target.closest(".lora-core-option");
                if (option) accept(Number(option.dataset.index));
            });
            document.body.appendChild(element);
            popup.element = element;
        }
        return popup.element;
    }

    function isOpen(textarea) {
        return popup.element !== null && popup.element.style.display !== "none" && (!textarea || popup.textarea === textarea);
    }

    function close() {
        if (popup.element) popup.element.style.display = "none";
        popup.textarea = null;
        popup.context = null;
        popup.choices = [];
    }

    const MIRRORED = ["boxSizing", "width", "borderTopWidth", "borderRightWidth", "borderBottomWidth", "borderLeftWidth",
        "paddingTop", "paddingRight", "paddingBottom", "paddingLeft", "fontStyle", "fontVariant", "fontWeight",
        "fontStretch", "fontSize", "lineHeight", "fontFamily", "textAlign", "textTransform", "textIndent",
        "letterSpacing", "wordSpacing", "tabSize"];

    /** Page coordinates of the bottom-left corner of the character at `index` of a textarea. */
    function caretCoordinates(textarea, index) {
        const style = getComputedStyle(textarea);
        const mirror = document.createElement("div");
        for (const property of MIRRORED) mirror.style[property] = style[property];
        mirror.style.position = "absolute";
        mirror.style.visibility = "hidden";
        mirror.style.whiteSpace = "pre-wrap";
        mirror.style.overflowWrap = "break-word";
        mirror.style.top = "0";
        mirror.style.left = "-9999px";
        mirror.textContent = textarea.value.slice(0, index);
        const marker = document.createElement("span");
        marker.textContent = "\u200b";
        mirror.appendChild(marker);
        document.body.appendChild(mirror);
        const lineHeight = marker.offsetHeight || parseFloat(style.fontSize) * 1.3;
        const top = marker.offsetTop - textarea.scrollTop + lineHeight;
        const left = marker.offsetLeft - textarea.scrollLeft;
        document.body.removeChild(mirror);
        const box = textarea.getBoundingClientRect();
        return {
            top: window.scrollY + box.top + Math.min(top, textarea.clientHeight + 2),
            left: window.scrollX + box.left + Math.min(left, textarea.clientWidth),
        };
    }

    function render() {
        const element = popupElement();
        element.replaceChildren();
        popup.choices.forEach((choice, index) => {
            const option = document.createElement("div");
            option.className = "lora-core-option" + (index === popup.selected ? " selected" : "");
            option.setAttribute("role", "option");
            option.setAttribute("aria-selected", index === popup.selected ? "true" : "false");
            option.dataset.index = String(index);
            option.dataset.value = choice.value;
            const value = document.createElement("span");
            value.className = "lora-core-value";
            value.textContent = choice.value;
            const detail = document.createElement("span");
            detail.className = "lora-core-detail";
            detail.textContent = choice.detail;
            option.append(value, detail);
            element.appendChild(option);
        });
        const where = caretCoordinates(popup.textarea, popup.context.from);
        element.style.display = "block";
        const width = element.offsetWidth;
        const right = window.scrollX + document.documentElement.clientWidth - 8;
        element.style.left = Math.max(window.scrollX, Math.min(where.left, right - width)) + "px";
        element.style.top = where.top + "px";
        const chosen = element.children[popup.selected];
        if (chosen) chosen.scrollIntoView({block: "nearest"});
    }

    /** Open, refresh or close the list for the caret of `textarea`. */
    function updateCompletion(textarea) {
        const caret = textarea.selectionStart;
        const context = textarea.selectionEnd === caret ? contextAt(textarea.value, caret) : null;
        if (!context) {
            if (isOpen(textarea)) close();
            return;
        }
        const pending = loadLists();
        if (!pending) return;
        pending.then((data) => {
            if (!data || document.activeElement !== textarea || textarea.selectionStart !== caret) return;
            const choices = choicesFor(context, data);
            if (!choices.length) {
                if (isOpen(textarea)) close();
                return;
            }
            const previous = popup.choices[popup.selected];
            popup.textarea = textarea;
            popup.context = context;
            popup.choices = choices;
            const kept = previous ? choices.findIndex((choice) => choice.value === previous.value) : -1;
            popup.selected = kept >= 0 ? kept : 0;
            render();
        });
    }

    function defaultWeight() {
        const weight = typeof opts !== "undefined" ? Number(opts.extra_networks_default_multiplier) : NaN;
        return isFinite(weight) ? String(weight) : "1";
    }

    function setText(textarea, text, selectionStart, selectionEnd) {
        textarea.value = text;
        textarea.setSelectionRange(selectionStart, selectionEnd);
        if (typeof updateInput === "function") {
            updateInput(textarea); // Gradio reads the value from this event
        } else {
            textarea.dispatchEvent(new Event("input", {bubbles: true}));
        }
    }

    /** Write the choice into the box. A new name gets ":WEIGHT>" with the weight selected (type to replace it, or
     * Ctrl+Up/Down); a key gets "=", and for lbw= the presets open at once. */
    function accept(index) {
        const textarea = popup.textarea;
        const context = popup.context;
        const choice = popup.choices[index];
        if (!textarea || !choice) return;
        const text = textarea.value;
        let insert = choice.insert;
        let to = context.to;
        if (context.kind === "name" && text[to] === '"') to++; // the closing quote of a quoted name
        let caret = context.from + insert.length;
        let selectionEnd = caret;
        if (context.kind === "name" && !/^\s*[:>]/.test(text.slice(to))) {
            const weight = defaultWeight();
            insert += ":" + weight + ">";
            caret += 1;
            selectionEnd = caret + weight.length;
        } else if (context.kind === "key" && text[to] === "=") {
            to++;
        }
        close();
        setText(textarea, text.slice(0, context.from) + insert + text.slice(to), caret, selectionEnd);
        if (context.kind === "key") updateCompletion(textarea);
    }

    function onKeyDown(event) {
        const textarea = event.currentTarget;
        if (!isOpen(textarea)) return;
        if (event.ctrlKey || event.metaKey || event.altKey) { // the WebUI's keys: weight editing, Generate...
            if (event.key !== "Control" && event.key !== "Meta" && event.key !== "Alt") close();
            return;
        }
        const count = popup.choices.length;
        switch (event.key) {
        case "ArrowDown":
            popup.selected = (popup.selected + 1) % count;
            render();
            break;
        case "ArrowUp":
            popup.selected = (popup.selected - 1 + count) % count;
            render();
            break;
        case "Enter":
        case "Tab":
            if (event.shiftKey) return;
            accept(popup.selected);
            break;
        case "Escape": // without this the WebUI would take Escape as "interrupt the generation"
            close();
            break;
        default:
            return;
        }
        event.preventDefault();
        event.stopPropagation();
    }

    // ------------------------------------------------------------------ the live check

    const checks = new WeakMap(); // textarea -> {box, negative, timer, sequence}

    function checkBox(textarea, block) {
        const state = checks.get(textarea);
        if (!state.box) {
            const box = document.createElement("div");
            box.id = block.id + "_lora_core_check";
            box.className = "lora-core-check";
            box.setAttribute("aria-live", "polite");
            box.style.display = "none";
            box.addEventListener("mousedown", (event) => {
                const item = event.target.closest(".lora-core-check-item");
                if (!item) return;
                event.preventDefault();
                textarea.focus();
                textarea.setSelectionRange(Number(item.dataset.start), Number(item.dataset.end)); // show the tag
            });
            block.appendChild(box);
            state.box = box;
        }
        return state.box;
    }

    function showCheck(textarea, answer) {
        const state = checks.get(textarea);
        const box = checkBox(textarea, state.block);
        box.replaceChildren();
        const items = answer ? answer.items.filter((item) => item.messages.length) : [];
        for (const item of items) {
            for (const message of item.messages) {
                const line = document.createElement("div");
                line.className = "lora-core-check-item lora-core-" + item.status;
                line.dataset.start = String(item.start);
                line.dataset.end = String(item.end);
                line.title = "Click to select the tag";
                const label = document.createElement("span");
                label.className = "lora-core-label";
                label.textContent = LABELS[item.status] || item.status;
                const text = document.createElement("span");
                text.className = "lora-core-message";
                text.textContent = message;
                line.append(label, text);
                box.appendChild(line);
            }
        }
        if (answer && answer.error) {
            const line = document.createElement("div");
            line.className = "lora-core-check-item lora-core-ignored";
            line.textContent = answer.error;
            box.appendChild(line);
        }
        box.style.display = box.children.length ? "block" : "none";
    }

    function runCheck(textarea) {
        const state = checks.get(textarea);
        const sequence = ++state.sequence;
        const prompt = textarea.value;
        if (!/<(lora|lyco):/.test(prompt)) { // nothing to ask
            showCheck(textarea, null);
            return;
        }
        fetch(CHECK_URL, {
            method: "POST",
            headers: {"Content-Type": "application/json"},
            body: JSON.stringify({prompt: prompt, negative: state.negative}),
        })
            .then((response) => (response.ok ? response.json() : null))
            .then((answer) => {
                if (sequence === state.sequence) showCheck(textarea, answer);
            })
            .catch(() => {
                if (sequence === state.sequence) showCheck(textarea, null); // the server is away: say nothing
            });
    }

    function scheduleCheck(textarea) {
        const state = checks.get(textarea);
        clearTimeout(state.timer);
        state.timer = setTimeout(() => runCheck(textarea), CHECK_DELAY_MS);
    }

    // ------------------------------------------------------------------ wiring

    function attach(block, negative) {
        const textarea = block.querySelector("textarea");
        if (!textarea || checks.has(textarea)) return;
        checks.set(textarea, {box: null, block: block, negative: negative, timer: null, sequence: 0});
        textarea.addEventListener("input", (event) => {
            scheduleCheck(textarea);
            // typing opens the list; a value set by a script (a card, Ctrl+Up/Down, pasted parameters) does not
            if (event.isTrusted && event.inputType) {
                updateCompletion(textarea);
            } else if (isOpen(textarea)) {
                close();
            }
        });
        textarea.addEventListener("keydown", onKeyDown);
        textarea.addEventListener("keyup", (event) => {
            if (isOpen(textarea) && ["ArrowLeft", "ArrowRight", "Home", "End"].includes(event.key)) updateCompletion(textarea);
        });
        textarea.addEventListener("click", () => {
            if (isOpen(textarea)) updateCompletion(textarea);
        });
        textarea.addEventListener("blur", () => {
            if (isOpen(textarea)) close();
        });
        textarea.addEventListener("focus", () => scheduleCheck(textarea)); // another checkpoint, a new file...
        scheduleCheck(textarea);
    }

    onUiLoaded(() => {
        const app = gradioApp();
        for (const [id, negative] of BOXES) {
            const block = app.querySelector("#" + id);
            if (block) attach(block, negative);
        }
        window.addEventListener("resize", close);
        document.body.dataset.loraCore = "ready"; // for the browser tests
    });
})();
