import labelers, time, sys
t=time.time()
from pipelines.zoo.judge import build_judge
build_judge("/tmp/jz")
print("build", time.time()-t)
t=time.time()
from transformers import AutoProcessor, AutoModelForImageTextToText
p=AutoProcessor.from_pretrained("/tmp/jz"); m=AutoModelForImageTextToText.from_pretrained("/tmp/jz")
print("load", time.time()-t, type(p).__name__, type(p.image_processor).__name__, type(p.tokenizer).__name__, type(m).__name__, sum(x.numel() for x in m.parameters()))
print(len(p.tokenizer), m.config.text_config.vocab_size, m.config.image_token_id, p.tokenizer.convert_tokens_to_ids("<|image_pad|>"))
from PIL import Image
msgs=[{"role":"system","content":"hello"},{"role":"user","content":[{"type":"image"},{"type":"text","text":"Rate {\"a\": 1}"}]}]
text=p.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
print(repr(text))
enc=p(text=[text], images=[Image.new("RGB",(64,64),"red")], return_tensors="pt")
print({k:v.shape for k,v in enc.items()})
print(p.tokenizer.tokenize('{"prompt_alignment": {"score": 4, "feedback": "Good."}}'))
out=m.generate(**enc, max_new_tokens=16, do_sample=False)
print(p.batch_decode(out[:, enc["input_ids"].shape[1]:]))
