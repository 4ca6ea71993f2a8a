"""fuselip_med.vocab: one home for token ids, modality names, ROCOv2 CUIs and CT windows, consistent with the
code that reads them."""
from fuselip_med import vocab
from fuselip_med.core.fuselip import FuseLIPConfig
from fuselip_med.core.text_tokenizer import TextTokenizer


def test_special_token_ids_are_the_ones_the_bpe_file_gives():
    tokenizer = TextTokenizer()
    assert (tokenizer.sot_token_id, tokenizer.eot_token_id, tokenizer.mask_token_id) == (
        vocab.SOT_TOKEN_ID, vocab.EOT_TOKEN_ID, vocab.MASK_TOKEN_ID)
    assert tokenizer.vocab_size == vocab.TEXT_VOCAB_SIZE == vocab.CLIP_BPE_VOCAB_SIZE + 1
    assert TextTokenizer(add_mask_token=False).vocab_size == vocab.CLIP_BPE_VOCAB_SIZE
    assert FuseLIPConfig.from_size("tiny").mask_token_id == vocab.MASK_TOKEN_ID


def test_modality_spellings_cuis_and_dicom_codes_map_to_the_short_names():
    cases = {"CT": "CT", " computed tomography ": "CT", "C0040405": "CT", "mr": "MRI",
             "Magnetic Resonance Imaging": "MRI", "DX": "X-ray", "plain x-ray": "X-ray", "US": "ultrasound",
             "XA": "angiography", "angiogram": "angiography",
             "PT": "PET", "positron-emission tomography": "PET", "fundus": None, "": None, None: None}
    assert {value: vocab.modality_name(value) for value in cases} == cases
    assert set(vocab.MODALITY_ALIASES.values()) == set(vocab.MODALITIES)
    assert {vocab.MODALITY_CUIS[m]: m for m in vocab.MODALITIES} == vocab.ROCOV2_MODALITIES
    assert set(vocab.ROCOV2_MODALITIES) <= set(vocab.ROCOV2_MANUAL_CUI_NAMES)


def test_modules_use_the_shared_tables():
    from fuselip_med.data import demo, images
    from fuselip_med.data.adapters import folder, rocov2
    from fuselip_med.eval import classification

    assert rocov2.ROCOV2_MODALITIES is vocab.ROCOV2_MODALITIES
    assert rocov2.ROCOV2_MANUAL_CUI_NAMES is vocab.ROCOV2_MANUAL_CUI_NAMES
    assert classification.MODALITY_CLASSES is vocab.MODALITIES
    assert images.WINDOW_PRESETS is vocab.WINDOW_PRESETS
    assert all(demo.CUI_NAMES[demo.MODALITY_CUIS[m]] == vocab.ROCOV2_MANUAL_CUI_NAMES[vocab.MODALITY_CUIS[m]]
               for m in demo.STUDIES)
    assert folder.normalize_modality("xa") == classification.normalize_modality("xa") == "angiography"
    assert folder.normalize_modality("Fundus") == "Fundus" and classification.normalize_modality("Fundus") is None
