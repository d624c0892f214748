// Copier LoRA tab: progress bar, Interrupt, taking images from the galleries, refreshing the Lora cards.
// Uses the WebUIs' own helpers: gradioApp, randomId, requestProgress, selected_gallery_index_id, updateInput,
// switch_to_txt2img, opts.

function copierLoraShowTab() {
    const tabs = gradioApp().querySelectorAll("#tabs > .tabitem");
    const buttons = gradioApp().querySelectorAll("#tabs > .tab-nav > button");
    tabs.forEach(function(tab, i) {
        if (tab.id === "tab_copier_lora" && buttons[i]) buttons[i].click();
    });
}

function copierLoraRefreshCards() {
    ["txt2img", "img2img"].forEach(function(tab) {
        const button = gradioApp().getElementById(tab + "_lora_extra_refresh_internal");
        if (button) button.dispatchEvent(new Event("click"));
    });
}

let copierLoraRunning = false; // a run this page started is queued or training
let copierLoraTask = ""; // its task id

function copierLoraShow(id, show) {
    const element = gradioApp().getElementById(id);
    if (element) element.style.display = show ? "" : "none";
}

function copierLoraShowIdle(show) {
    copierLoraShow("copier_lora_train", show);
    // The last run's sentence (an error, say) is not shown under the bar of the next: it is back, or replaced by
    // this run's, when the bar ends.
    copierLoraShow("copier_lora_status", show);
}

function copierLoraStart() {
    // Like txt2img's Generate, Train is hidden while its run goes; a gallery button pressed meanwhile sends no task
    // id, and the tab says a run is going instead of queueing a second one.
    const args = Array.from(arguments);
    if (copierLoraRunning) {
        args[0] = "";
        copierLoraShow("copier_lora_status", true); // for the sentence that says so
        return args;
    }
    copierLoraRunning = true;
    copierLoraShowIdle(false);
    const id = randomId();
    copierLoraTask = id;
    requestProgress(
        id,
        gradioApp().getElementById("copier_lora_status"),
        null,
        function() {
            copierLoraRunning = false;
            copierLoraShowIdle(true);
            copierLoraRefreshCards();
        }
    );
    args[0] = id;
    return args;
}

function copierLoraGalleryStart() {
    if (typeof opts !== "undefined" && opts.copier_lora_gallery_trains === false) {
        return Array.from(arguments);
    }
    return copierLoraStart.apply(null, arguments);
}

function copierLoraTake(gallery, info, index) {
    // Called from the gallery's own button (its tab is visible) or from the tab's "From …" buttons, where the
    // WebUI's selected_gallery_index() sees no gallery (it looks at visible ones only): each gallery's own index.
    const selected = {};
    for (const tab of ["txt2img", "img2img"]) {
        selected[tab] = typeof selected_gallery_index_id === "function" ? selected_gallery_index_id(`${tab}_gallery`) : -1;
    }
    copierLoraShowTab();
    return [gallery, info, JSON.stringify(selected)];
}

function copierLoraWithTag(prompt, tag) {
    // The tag alone joins txt2img's prompt, as a Lora card's click adds its tag, in place of the same LoRA's tag at
    // another weight.
    const name = tag.slice("<lora:".length, tag.lastIndexOf(":"));
    const parts = prompt.split(/(<[^<>]*>)/);
    const same = parts.findIndex(part => part.startsWith(`<lora:${name}:`));
    if (same < 0) return prompt.trim() ? `${prompt.trimEnd()} ${tag}` : tag;
    parts[same] = tag;
    return parts.join("");
}

function copierLoraSend(text) {
    // Only the prompt changes: the WebUI's infotext paste would also empty the negative prompt and set Clip skip.
    // Sent with a prompt, the prompt and the tag replace txt2img's prompt; the tag alone is added to it.
    const box = gradioApp().querySelector("#txt2img_prompt textarea");
    if (box) {
        box.value = /^<lora:[^<>]*>$/.test(text) ? copierLoraWithTag(box.value, text) : text;
        updateInput(box);
    }
    switch_to_txt2img();
    return [];
}

function copierLoraInterrupt() {
    // This page's run, by its task id: withdrawn while it waits in the WebUI's queue (nothing else stops), stopped
    // when it goes. Without one (Generate here, a run of another page's), whatever holds the WebUI stops. Not through
    // txt2img's Interrupt: it left txt2img's Generate covered by its "Interrupting..." button, and Forge said the
    // training would "stop after finishing this image".
    return [copierLoraRunning ? copierLoraTask : ""];
}
